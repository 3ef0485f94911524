"""Held-out evaluation: validation loss and greedy accuracy, both split over ranks."""
from __future__ import annotations

from .. import data as D
from ..grading import extract_answer, is_equiv

def answers_match(pred: str | None, gold: str | None) -> bool:
    """fastmath.grading's verdict: the prediction against the reference answer."""
    return pred is not None and gold is not None and is_equiv(pred, gold)


def _autocast(dev):
    import contextlib

    import torch

    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _CountedModel:
    """The model as the engine sees it, counting forward calls (the lock-step needs the count)."""

    def __init__(self, model):
        self.model, self.args, self.calls = model, model.args, 0

    def eval(self):
        self.model.eval()
        return self

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.model(*args, **kw)


def greedy_decode(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, dist_=None) -> list[dict]:
    """Greedy completions of `prompts` with the serving engine (temperature 0, stop at EOS), one dict per
    prompt: {"token_ids", "text"}. The one greedy decoder of fastmath (sample, serve and the trainer share it).

    Lock-step (dist_ enabled, e.g. FSDP, where every forward is a collective): each rank decodes its own
    prompts, and after every engine step the ranks agree on the most forward calls any of them made in that
    step and whether any still has work; a rank that made fewer (or has nothing left) runs dummy one-token
    forwards, so every rank calls the model the same number of times.
    """
    import torch

    from ..distributed import all_reduce
    from ..engine import Engine, SamplingParams

    lock = dist_ is not None and dist_.enabled
    counted = _CountedModel(model)
    dev = next(model.parameters()).device
    out: list[dict | None] = [None] * len(prompts)
    engine = None
    if prompts:
        longest = max(len(p) for p in prompts)
        args = model.args
        kv_bytes = (2 * args.n_layers * args.n_kv_heads * args.head_dim * 4 * len(prompts)
                    * (longest + max_new_tokens + 16))  # fp32 K and V of every prompt and completion
        engine = Engine(counted, tokenizer, kv_cache_gb=1.25 * kv_bytes / 2**30 + 1e-3, max_slots=len(prompts),
                        max_model_len=longest + max_new_tokens, max_prompt_len=longest, max_new_tokens=max_new_tokens,
                        n_prompts=len(prompts), stream=False, prefill_tokens=max(8192, longest * len(prompts)))
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, stop_at_answer=False, seed=0)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params, noise_key=i)
    any_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id  # Qwen2.5 has no BOS
    dummy = {"tokens": torch.tensor([any_id], device=dev), "positions": torch.zeros(1, dtype=torch.long, device=dev),
             "cu_seqlens": torch.tensor([0, 1], dtype=torch.int32, device=dev), "max_seqlen": 1}
    if lock:
        # FSDP2 allocates its all-gather buffers on first use and reuses them; the engine decodes under
        # inference_mode, and buffers born there could not be written by training later. One forward outside
        # it first makes them ordinary tensors (inference mode may write into those).
        with torch.no_grad(), _autocast(dev):
            model(**dummy)
    with torch.no_grad(), _autocast(dev):
        while True:
            before = counted.calls
            if engine is not None and engine.has_unfinished():
                for ro in engine.step():
                    if ro.finished:
                        so = ro.outputs[0]
                        out[int(ro.request_id)] = {"token_ids": list(so.token_ids), "text": so.text}
            if not lock:
                if engine is None or not engine.has_unfinished():
                    break
                continue
            agree = torch.tensor([counted.calls - before, float(engine is not None and engine.has_unfinished())],
                                 dtype=torch.float64)
            all_reduce(agree, dist_, op=torch.distributed.ReduceOp.MAX)
            for _ in range(int(agree[0]) - (counted.calls - before)):
                model(**dummy)  # the forward another rank is making: same collectives, output unused
            if not agree[1]:
                break
    return out


def greedy_accuracy(model, tokenizer, problems: list[dict], template: str, max_new_tokens: int, dist_
                    ) -> tuple[float, list[dict]]:
    """Share of `problems` ({'question', 'answer'}) whose greedy answer matches; problems split over ranks,
    decoded by the engine in lock-step (see greedy_decode)."""
    import torch

    from ..distributed import all_reduce

    was_training = model.training
    model.eval()
    mine = problems[dist_.rank::dist_.world_size]
    prompts = [D.encode_prompt(tokenizer, p["question"], template) for p in mine]
    gens = greedy_decode(model, tokenizer, prompts, max_new_tokens, dist_)
    rows = []
    for p, g in zip(mine, gens):
        text = g["text"]
        pred = extract_answer(text)  # fastmath.grading: the same extraction as `fastmath sample`
        rows.append({"question": p["question"], "gold": p["answer"], "pred": pred, "output": text,
                     "correct": answers_match(pred, str(p["answer"]))})
    counts = torch.tensor([sum(r["correct"] for r in rows), len(rows)], dtype=torch.float64)
    all_reduce(counts, dist_)
    model.train(was_training)
    return float(counts[0] / max(1.0, float(counts[1]))), rows


def validation_loss(model, stream: D.PackedStream, dist_, dev) -> float:
    """Mean cross-entropy per target token over every held-out pack (ranks share the packs)."""
    import torch

    from ..distributed import all_reduce

    packs = stream.epoch_packs(0)
    n_rounds = -(-len(packs) // dist_.world_size)
    total = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(dev):
        for r in range(n_rounds):
            i = r * dist_.world_size + dist_.rank
            real = i < len(packs)
            b = D.make_batch(stream.docs, stream.labels, packs[i if real else 0])
            loss_sum, n = model(**b.to_torch(dev))
            if real:
                total += torch.tensor([float(loss_sum), float(n)], dtype=torch.float64)
    all_reduce(total, dist_)
    model.train(was_training)
    return float(total[0] / max(1.0, float(total[1])))


