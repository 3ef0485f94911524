"""Train the `test` preset for 10 AdamW steps with the Triton kernels on and off: per-step losses agree.

Same initial weights, same packed batches (three documents per step, 120 tokens, positions restarting per
document, no label on each document's last token); two batches alternate so that the loss visibly falls.
Tolerance, relative per step: 1e-4 in fp32 (measured on the interpreter: 4e-7) and 1e-2 under bf16 autocast (measured: 2.8e-3; bf16
rounding differs between the paths, and the interpreter truncates instead of rounding).
"""
import copy

import pytest
import torch

from fastmath.config import get_preset
from fastmath.kernels import use_triton
from fastmath.model import Transformer

STEPS = 10
DOC_LENGTHS = (50, 33, 37)  # 120 tokens per step


def packed_batches(vocab_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        docs = [torch.randint(3, vocab_size, (n,), generator=g) for n in DOC_LENGTHS]
        tokens = torch.cat(docs)
        positions = torch.cat([torch.arange(n) for n in DOC_LENGTHS])
        # label at t = the next token of the same document; none for each document's last token
        labels = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs])
        cu_seqlens = torch.tensor([0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
        batches.append(tuple(t.to(device) for t in (tokens, positions, cu_seqlens, labels)))
    return (batches * STEPS)[:STEPS]


def train(model, batches, autocast):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    device = next(model.parameters()).device.type
    losses = []
    for tokens, positions, cu_seqlens, labels in batches:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss_sum, n_targets = model(tokens, positions=positions, cu_seqlens=cu_seqlens,
                                        max_seqlen=max(DOC_LENGTHS), labels=labels)
        loss = loss_sum / n_targets
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("autocast,rtol", [(False, 1e-4), (True, 1e-2)])
def test_kernels_on_and_off_train_alike(autocast, rtol, kt, monkeypatch):
    torch.manual_seed(0)
    model_off = Transformer(get_preset("test")).to(kt.device)
    model_on = copy.deepcopy(model_off)
    batches = packed_batches(model_off.args.vocab_size, kt.device)

    monkeypatch.setenv("FASTMATH_KERNELS", "1")
    kt.require_triton(batches[0][0])
    with monkeypatch.context() as m:
        kt.forbid_references(m)  # the "on" run must not touch a PyTorch reference
        losses_on = train(model_on, batches, autocast)
    monkeypatch.setenv("FASTMATH_KERNELS", "0")
    assert not use_triton(batches[0][0])
    losses_off = train(model_off, batches, autocast)

    assert losses_off[-1] < losses_off[0] - 0.5, f"training did not move the loss: {losses_off}"
    for step, (on, off) in enumerate(zip(losses_on, losses_off)):
        assert abs(on - off) <= rtol * abs(off), f"step {step}: kernels on {on:.6f} vs off {off:.6f}"
