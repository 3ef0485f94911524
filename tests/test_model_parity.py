"""fastmath's LLaMA against Hugging Face transformers' LlamaForCausalLM on the same random weights."""
import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastmath  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixture import greedy_reference  # noqa: E402

CONFIGS = {
    "mha": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(hidden_size=96, intermediate_size=224, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2),
}


def make_hf(kind, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=101, rms_norm_eps=1e-5, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=False, **CONFIGS[kind])
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norm weights not all ones, so a dropped weight would show
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pair(request, tmp_path_factory):
    hf = make_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    sharded = request.param == "gqa"  # one of the two goes through an index file and several shards
    hf.save_pretrained(path, max_shard_size="50KB" if sharded else "5GB")
    assert (path / "model.safetensors.index.json").exists() == sharded
    return hf, fastmath.load_model(path).eval()


def test_padded_logits_match(pair):
    hf, fm = pair
    tokens = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = fm(tokens)
    assert out.shape == ref.shape == (3, 17, 101)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_packed_logits_match_separate_forwards(pair):
    hf, fm = pair
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 101, (n,), generator=g) for n in (5, 1, 12, 8)]
    tokens = torch.cat(docs)
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    cu = torch.tensor([0, 5, 6, 18, 26], dtype=torch.int32)
    with torch.no_grad():
        out = fm(tokens, positions=positions, cu_seqlens=cu, max_seqlen=12)
        ref = torch.cat([hf(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_loss_matches_transformers(pair):
    hf, fm = pair
    tokens = torch.randint(0, 101, (2, 15), generator=torch.Generator().manual_seed(3))
    hf_labels = tokens.clone()
    hf_labels[0, :4] = -100  # a prompt that is not a target
    # fastmath labels are aligned: the label at t is the token at t+1, -100 at the end.
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = hf_labels[:, 1:]
    with torch.no_grad():
        ref = hf(tokens, labels=hf_labels).loss
        loss_sum, n = fm(tokens, labels=labels)
    assert int(n) == (hf_labels[:, 1:] != -100).sum()
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(pair):
    hf, fm = pair
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 101, (n,), generator=g).tolist() for n in (3, 9, 6)]
    ours = [greedy_reference(fm, p, 20) for p in prompts]
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):]
        assert new == ref.tolist()


def test_gradients_flow_and_checkpointing_matches():
    torch.manual_seed(0)
    model = fastmath.load_model("test")
    tokens = torch.randint(0, 512, (2, 16))
    labels = torch.roll(tokens, -1, 1)

    def grads(ckpt):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        loss, n = model(tokens, labels=labels)
        (loss / n).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, ckpt = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_packed_error_within_2x_of_transformers_own(pair, device):
    """In bf16 (on CUDA: Triton kernels and the fused attention backend), fastmath's error against the
    fp32 reference is at most 2x transformers' own bf16 error."""
    hf, fm = pair
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 101, (n,), generator=g) for n in (9, 16, 3)]
    with torch.no_grad():
        ref = torch.cat([hf(d[None]).logits[0] for d in docs]).double()
        hf16 = copy.deepcopy(hf).to(device, torch.bfloat16)
        hf_err = (torch.cat([hf16(d[None].to(device)).logits[0] for d in docs]).double().cpu() - ref).abs().max()
        fm16 = copy.deepcopy(fm).to(device, torch.bfloat16)
        tokens = torch.cat(docs).to(device)
        positions = torch.cat([torch.arange(len(d)) for d in docs]).to(device)
        cu = torch.tensor([0, 9, 25, 28], dtype=torch.int32, device=device)
        out = fm16(tokens, positions=positions, cu_seqlens=cu, max_seqlen=16)
    err = (out.double().cpu() - ref).abs().max()
    assert err <= 2 * hf_err + 1e-3, (float(err), float(hf_err))
