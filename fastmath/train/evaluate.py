"""Held-out evaluation: validation loss and greedy accuracy, both split over ranks."""
from __future__ import annotations

from .. import data as D
from ..grading import extract_answer, is_equiv

def answers_match(pred: str | None, gold: str | None) -> bool:
    """fastmath.grading's verdict: the prediction against the reference answer."""
    return pred is not None and gold is not None and is_equiv(pred, gold)


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, dist_=None) -> list[list[int]]:
    """Batched greedy decoding with a KV cache. Under FSDP every rank must call this with the same number of
    prompts; the stopping test is agreed across ranks so all run the same number of forwards."""
    import torch

    from ..attention import KVCache
    from ..distributed import all_reduce

    dev = next(model.parameters()).device
    args = model.args
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cache = KVCache(args.n_layers, len(prompts), int(lengths.max()) + max_new_tokens, args.n_kv_heads, args.head_dim,
                    dtype, dev)
    tokens = torch.tensor([t for p in prompts for t in p], device=dev)
    positions = torch.cat([torch.arange(n, device=dev) for n in lengths.tolist()])
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    with torch.no_grad(), _autocast(dev):
        cache.prefill(lengths)
        logits = model(tokens, positions=positions, cache=cache, logits_index=torch.cumsum(lengths, 0) - 1)
        cache.advance()
        for step in range(max_new_tokens):
            nxt = logits.float().argmax(-1)  # (B,)
            for b in (~done).nonzero().flatten().tolist():
                out[b].append(int(nxt[b]))
            done |= nxt == eos_id
            remaining = (~done).sum().reshape(1)
            if dist_ is not None:
                all_reduce(remaining, dist_)
            if int(remaining) == 0 or step == max_new_tokens - 1:
                break
            cache.decode()
            logits = model(nxt, positions=cache.lengths.long(), cache=cache)
            cache.advance()
    return out


def _autocast(dev):
    import contextlib

    import torch

    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def greedy_accuracy(model, tokenizer, problems: list[dict], template: str, max_new_tokens: int, dist_,
                    batch_size: int = 64) -> tuple[float, list[dict]]:
    """Share of `problems` ({'question', 'answer'}) whose greedy answer matches; problems split over ranks."""
    import torch

    from ..distributed import all_reduce

    was_training = model.training
    model.eval()
    mine = problems[dist_.rank::dist_.world_size]
    per_rank = -(-len(problems) // dist_.world_size)
    rows = []
    for s in range(0, per_rank, batch_size):
        chunk = mine[s:s + batch_size]
        prompts = [D.encode_prompt(tokenizer, p["question"], template) for p in chunk]
        n_real = len(prompts)
        want = min(batch_size, per_rank - s)
        prompts += [prompts[0] if prompts else [tokenizer.bos_id]] * (want - n_real)  # same forwards on every rank
        gens = greedy_generate(model, prompts, max_new_tokens, tokenizer.eos_id, dist_ if dist_.enabled else None)
        for p, g in zip(chunk, gens[:n_real]):
            text = tokenizer.decode(g)
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


