"""The fixture behind tests/data/sample_fixture.json: a tiny deterministic fp32 model, a tokenizer and
prompts, all rebuilt from seeds, so that `fastmath sample`'s samples can be compared with those that the
sampler wrote before the engine split (issue 14 item 3).

Run `python tests/engine_fixture.py` to regenerate the fixture (only when the sampling itself is meant to
change: the point of the file is that it does not).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "data" / "sample_fixture.json"
# evaluate() settings: temperature > 0 with top-p, a greedy extra, stop at the answer line
EVAL_ARGS = dict(n=4, temperature=1.0, top_p=0.9, max_new_tokens=20, seed=3, greedy=True, problems=5,
                 template="plain", max_slots=6, stop_at_answer=True)


def build(root: Path):
    """(checkpoint directory, tokenizer, model) under `root`: the `test` preset, seed 0, std 0.2."""
    from fastmath.checkpoint import save_checkpoint
    from fastmath.config import get_preset
    from fastmath.model import Transformer
    from fastmath.synth.procedural import SMALL_CONFIG, generate
    from fastmath.tokenizer import train_tokenizer

    recs = generate(300, SMALL_CONFIG)
    tok = train_tokenizer([r["question"] + "\n" + r["solution"] for r in recs], root / "tok.model", vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(get_preset("test").replace(vocab_size=tok.vocab_size))
    model.init_weights(std=0.2)  # clear margins between choices: float noise does not flip a token
    model = model.float().eval()
    save_checkpoint(model, root / "ckpt", tokenizer_path=tok.path)
    return root / "ckpt", tok, model


def produce(root: Path) -> dict:
    """Run `fastmath sample`'s Python API (evaluate) and Sampler.run (token ids); return the fixture dict."""
    from fastmath.data import encode_prompt
    from fastmath.sampler import Sampler, SamplingParams, evaluate
    from fastmath.synth.procedural import SMALL_CONFIG, heldout_set

    ckpt, tok, model = build(root)
    # The problems of the built-in held-out set the fixture was written with (SMALL_CONFIG, the default then),
    # pinned in a file so that a new procedural default does not change them.
    data = root / "heldout.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("question", "solution", "answer")}) + "\n"
                            for r in heldout_set(EVAL_ARGS["problems"], SMALL_CONFIG)))
    evaluate(model=str(ckpt), data=str(data), out=str(root / "eval"), device="cpu", progress=False,
             log=lambda *a: None, **EVAL_ARGS)
    recs = [json.loads(x) for x in (root / "eval" / "samples.jsonl").read_text().splitlines()]
    keep = ("index", "completions", "token_counts", "greedy_completion", "greedy_token_count", "finish_reasons")
    samples = [{k: r.get(k) for k in keep} for r in sorted(recs, key=lambda r: r["index"])]
    # token ids through Sampler.run: another prompt set, no answer stop, top-k, 3 slots
    prompts = [encode_prompt(tok, r["question"], "plain") for r in heldout_set(4, SMALL_CONFIG)]
    params = SamplingParams(n=5, temperature=0.8, top_k=20, max_new_tokens=16, seed=7, greedy=True,
                            stop_at_answer=False, stop_strings=("=",))
    res = sorted(Sampler(model, tok, max_slots=3).run(prompts, params), key=lambda r: r.index)
    tokens = [{"index": r.index, "samples": [c.tokens for c in r.samples], "greedy": r.greedy.tokens,
               "reasons": [c.finish_reason for c in r.samples], "texts": [c.text for c in r.samples]} for r in res]
    return {"eval_args": EVAL_ARGS, "samples_jsonl": samples, "sampler_run": tokens}


if __name__ == "__main__":
    import tempfile

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF's `kernels`
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        fx = produce(Path(d))
    FIXTURE.write_text(json.dumps(fx, separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy continuation by full recomputation (no KV cache, no engine): argmax of the last position's
    logits, appended, until EOS (included) or max_new_tokens. The independent reference the engine's greedy
    decoding (fastmath's one greedy decoder) is checked against."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
    return out
