"""LoRA: frozen base, adapters only in the optimizer, PEFT-format export that `peft` loads on transformers'
LlamaForCausalLM with logits equal to fastmath's, --merge, exact resume, --compile, and falling held-out loss."""
import json
import os
from pathlib import Path

import pytest
import torch

from fastmath import data as D
from fastmath import train as T
from fastmath.checkpoint import load_model, save_checkpoint
from fastmath.config import get_preset
from fastmath.model import Transformer
from fastmath.synth.procedural import SMALL_CONFIG, SMALL_SPEC, generate
from fastmath.tokenizer import Tokenizer, train_tokenizer
from fastmath.train import lora as L

OPTS = {"procedural": SMALL_SPEC, "procedural_examples": 300, "val_examples": 16, "eval_problems": 0, "micro_batch_tokens": 1024,
        "batch_tokens": 1024, "threads": 1, "progress": False, "lr": 1e-2, "warmup": 0.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random LLaMA checkpoint with its tokenizer (the model LoRA adapts)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("lora")
    recs = generate(300, SMALL_CONFIG, seed=9)
    tok_path = d / "tok.model"
    train_tokenizer([D.render_prompt(r["question"]) for r in recs] + [r["solution"] for r in recs], tok_path, 400)
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    model = Transformer(get_preset("test").replace(vocab_size=tok.vocab_size, max_seq_len=512))
    save_checkpoint(model, d / "base", tokenizer_path=tok_path)
    return d / "base"


def lora_run(base, out, **kw):
    opts = {**OPTS, "lora_rank": 4, "lora_alpha": 8, "max_steps": 4, "lora_targets": "q,k,v,o,gate,up,down", **kw}
    cfg = T.TrainConfig(model=str(base), out=str(out), **opts)
    return T.train(cfg)


def test_lora_trains_adapters_only_and_peft_loads_them(tmp_path, base):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    s = lora_run(base, tmp_path / "runs", merge=True)
    run = Path(s["run_dir"])
    adapter = run / "final"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve()) and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert not (adapter / "model.safetensors").exists()  # an adapter, not a copy of the base

    # fastmath's adapted model: the base with the trained adapter (not merged) ...
    ours, _ = L.load_model_or_adapter(adapter)  # merged on load
    fm = load_model(base, dtype=torch.float32)
    L.load_adapter(fm, adapter, merge=False)
    base_sd = load_model(base, dtype=torch.float32).state_dict()
    for n, p in fm.named_parameters():  # the base weights came back unchanged: they were frozen
        if not L.is_lora_name(n):
            assert torch.equal(p, base_sd[n]), n
    assert any(float(p.detach().abs().sum()) > 0 for n, p in fm.named_parameters() if ".lora_B." in n)  # B left zero

    # ... against peft on transformers, loaded offline from the directories alone.
    hf = transformers.LlamaForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3, 60, 11]])
    with torch.no_grad():
        ref = pm(ids).logits[0].double()
        got = fm.eval()(ids)[0].double()
        got_merged = ours.eval()(ids)[0].double()
        merged = load_model(run / "merged", dtype=torch.float32).eval()(ids)[0].double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_merged, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and the adapter matters: the base alone differs
        assert (load_model(base, dtype=torch.float32).eval()(ids)[0].double() - ref).abs().max() > 1e-3


def test_lora_optimizer_holds_adapters_only(base):
    model = load_model(base, dtype=torch.float32)
    n_all = sum(p.numel() for p in model.parameters())
    L.apply_lora(model, 4, 8, 0.0, "q,v")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(L.is_lora_name(n) for n in trainable)
    args = model.args
    expect = args.n_layers * 4 * ((args.dim + args.n_heads * args.head_dim) + (args.dim + args.n_kv_heads * args.head_dim))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expect
    assert L.lora_memory(args, 4, "q,v")["adapter_params"] == expect
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == n_all


def test_lora_resume_is_exact(tmp_path, base):
    """A LoRA run cut after step 2 and resumed ends with bitwise the adapters of an uninterrupted run
    (dropout on: the RNG state is part of the checkpoint)."""
    full = lora_run(base, tmp_path / "a", lora_dropout=0.1, max_steps=4)
    cut = lora_run(base, tmp_path / "b", lora_dropout=0.1, max_steps=4, save_every=2)
    run_b = Path(cut["run_dir"])
    # Simulate a kill after step 2: drop the later checkpoint and outputs, then resume.
    import shutil

    for p in [run_b / "checkpoints" / "step_4", run_b / "final"]:
        shutil.rmtree(p)
    T.train(T.TrainConfig(), resume=str(run_b), resume_overrides={"progress": False})
    a = L.read_adapter_config(Path(full["run_dir"]) / "final")
    from fastmath.checkpoint import iter_safetensors

    ta = dict(iter_safetensors(Path(full["run_dir"]) / "final" / "adapter_model.safetensors"))
    tb = dict(iter_safetensors(run_b / "final" / "adapter_model.safetensors"))
    assert a["r"] == 4 and ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_lora_held_out_loss_falls(tmp_path, base):
    s = lora_run(base, tmp_path / "runs", max_steps=8)
    recs = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in recs if "loss" in r)
    # The base's validation loss, measured the same way (the trainer's validation on the untouched base).
    model = load_model(base, dtype=torch.float32)
    cfg = T.resolve_config(T.TrainConfig(model=str(base), **OPTS), False, 1)
    from fastmath.distributed import Dist

    prep = T.prepare_data(cfg, None, Dist())
    val = D.PackedStream(prep.val, max(1024, int(prep.val.lengths.max())))
    base_val = T.validation_loss(model, val, Dist(), torch.device("cpu"))
    assert s["val_loss"] < base_val - 0.2, (s["val_loss"], base_val, first)


def test_lora_with_compile_matches_eager(tmp_path, base):
    eager = lora_run(base, tmp_path / "e", max_steps=2)
    comp = lora_run(base, tmp_path / "c", max_steps=2, compile=True)
    le = [json.loads(x)["loss"] for x in (Path(eager["run_dir"]) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lc = [json.loads(x)["loss"] for x in (Path(comp["run_dir"]) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    torch.testing.assert_close(torch.tensor(lc), torch.tensor(le), rtol=1e-4, atol=1e-5)


def test_lora_options_are_checked_for_api_users(base):
    with pytest.raises(ValueError, match="--lora-targets"):
        T.train(T.TrainConfig(model=str(base), lora_rank=4, lora_targets="q,z"))
    with pytest.raises(ValueError, match="--merge"):
        T.train(T.TrainConfig(model=str(base), merge=True))
    with pytest.raises(ValueError, match="checkpoint directory"):
        T.train(T.TrainConfig(model="test", lora_rank=4))


def test_lora_dry_run_shows_memory(base, tmp_path):
    s = T.train(T.TrainConfig(model=str(base), out=str(tmp_path), lora_rank=8, **OPTS), dry_run=True)
    assert s["lora_params"] > 0


def test_sample_accepts_an_adapter_directory(tmp_path, base):
    """`fastmath sample --model ADAPTER` loads the base through base_model_name_or_path (or --base) and samples
    exactly what the merged full checkpoint samples."""
    from click.testing import CliRunner

    from fastmath.cli import main

    s = lora_run(base, tmp_path / "runs", merge=True, max_steps=2)
    run = Path(s["run_dir"])
    data = tmp_path / "problems.jsonl"  # pinned: merged/ has no run config to name the procedural difficulty
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(2, SMALL_CONFIG, split="test", seed=0)))
    args = ["--n", "2", "--data", str(data), "--max-new-tokens", "10", "--greedy", "--template", "plain"]
    outs = {}
    for name, extra in (("adapter", ["--model", str(run / "final")]), ("merged", ["--model", str(run / "merged")]),
                        ("based", ["--model", str(run / "final"), "--base", str(base)])):
        res = CliRunner().invoke(main, ["sample", *extra, *args, "--out", str(tmp_path / name)],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        outs[name] = [{k: r[k] for k in ("completions", "greedy_completion")}
                      for r in map(json.loads, (tmp_path / name / "samples.jsonl").read_text().splitlines())]
    assert outs["adapter"] == outs["merged"] == outs["based"]
    bad = CliRunner().invoke(main, ["sample", "--model", str(run / "final"), "--base", str(tmp_path), *args,
                                    "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0


def test_lora_under_fsdp_two_processes_match_one(tmp_path, base):
    """FSDP2 with frozen base weights (2 gloo processes, 1 micro-batch each) follows the 1-process loss
    trajectory with the same global batch, and exports the same adapter."""
    import subprocess
    import sys

    from fastmath.checkpoint import iter_safetensors

    opts = {**OPTS, "batch_tokens": 2048, "max_steps": 3, "lora_rank": 4, "lora_alpha": 8, "eval_problems": 5,
            "eval_max_new_tokens": 12}
    one = T.train(T.TrainConfig(model=str(base), out=str(tmp_path / "one"), **opts))
    args = ["--model", str(base), "--out", str(tmp_path / "two"), "--no-progress"]
    for k, v in opts.items():
        if k != "progress":
            args += ["--" + k.replace("_", "-"), str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastmath.cli", "train", *args]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = (tmp_path / "two" / "latest").resolve()
    assert json.loads((two / "config.json").read_text())["world_size"] == 2

    def losses(run):
        return [json.loads(x)["loss"] for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one["run_dir"])), rtol=2e-5, atol=1e-6)
    a = dict(iter_safetensors(Path(one["run_dir"]) / "final" / "adapter_model.safetensors"))
    b = dict(iter_safetensors(two / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # Greedy evaluation in lock-step: rank 0 decoded problems 0, 2, 4 while rank 1 had two (fewer forwards),
    # and got the texts one process got for them.
    rows1 = [json.loads(x) for x in (Path(one["run_dir"]) / "greedy_eval.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (two / "greedy_eval.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows2] == [r["question"] for r in rows1[0::2]]
    assert [r["output"] for r in rows2] == [r["output"] for r in rows1[0::2]]


def test_serve_accepts_an_adapter_directory(tmp_path, base):
    """`fastmath serve --model ADAPTER`: greedy completions equal the full-recompute greedy decoding of the
    merged checkpoint (an independent path: no engine, no KV cache)."""
    pytest.importorskip("fastapi")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine_fixture import greedy_reference
    from serve_util import Server, http

    s = lora_run(base, tmp_path / "runs", merge=True, max_steps=2)
    run = Path(s["run_dir"])
    merged = load_model(run / "merged", dtype=torch.float32).eval()
    tok = Tokenizer(run / "final")
    server = Server(run / "final")
    try:
        prompt = "Question: 3 + 4 = ?"
        status, body = http("POST", server.base_url + "/completions",
                            {"model": str(run / "final"), "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert status == 200, body
        ref = greedy_reference(merged, tok.encode(prompt, bos=True), 8, tok.eos_id)
        assert body["choices"][0]["text"] == tok.decode([t for t in ref if t != tok.eos_id])
    finally:
        server.stop()
