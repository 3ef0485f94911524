"""LoRA on every family: fastmath's adapters on LLaMA-3 (tied, GQA, head_dim), Mistral and Qwen2 (q/k/v biases,
tied and untied) give transformers' logits when the saved adapter is put on transformers' model, by PEFT
(when installed) and by an independent LoRA forward on transformers' own modules; the merged export reopens
in transformers with equal logits. The base bias stays frozen and unsaved; a tied head stays one frozen
parameter, stored once."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_family_parity import FAMILIES, V, make_hf  # noqa: E402

from fastmath.checkpoint import iter_safetensors, load_model, save_checkpoint  # noqa: E402
from fastmath.train import lora as L  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_with_adapter(base, adapter):
    """transformers' model from `base` with the adapter's low-rank update added by forward hooks on transformers'
    own nn.Linear modules (PEFT's unmerged LoRA forward: y + alpha/r * x A^T B^T), reading only the two files."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = dict(iter_safetensors(adapter / "adapter_model.safetensors"))
    modules = dict(hf.named_modules())
    hooked = []
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        a, b = tensors[key].double(), tensors[key.replace(".lora_A.", ".lora_B.")].double()

        def hook(mod, inp, out, a=a, b=b):
            return out + (scale * (inp[0].double() @ a.T @ b.T)).to(out.dtype)

        modules[name].register_forward_hook(hook)
        hooked.append(name)
    return hf, sorted(hooked)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_lora_adapter_and_merge_match_transformers(kind, tmp_path):
    torch.manual_seed(0)
    hf = make_hf(kind)
    base = tmp_path / "base"
    hf.save_pretrained(base)
    fm = load_model(base, dtype=torch.float32)
    a = fm.args
    L.apply_lora(fm, 4, 8, 0.0, "q,k,v,o,gate,up,down")

    # All seven projections of every layer are adapted, the biased q/k/v keep the base bias (frozen), the tied
    # head stays the embedding (one frozen parameter, no LoRA on it) and only lora_A / lora_B train.
    adapted = sorted(n for n, _ in L.lora_modules(fm))
    expect = sorted(f"layers.{i}.{'self_attn' if p in SEVEN[:4] else 'mlp'}.{p}" for i in range(a.n_layers) for p in SEVEN)
    assert adapted == expect
    hf_params = dict(hf.named_parameters())
    for i, layer in enumerate(fm.layers):
        for p in ("q_proj", "k_proj", "v_proj"):
            mod = getattr(layer.self_attn, p)
            assert (mod.bias is not None) == a.qkv_bias == kind.startswith("qwen2")
            if a.qkv_bias:
                assert not mod.bias.requires_grad
                assert torch.equal(mod.bias, hf_params[f"model.layers.{i}.self_attn.{p}.bias"])
    assert (fm.lm_head.weight is fm.embed_tokens.weight) == a.tie_embeddings
    assert not isinstance(fm.lm_head, L.LoRALinear) and not fm.lm_head.weight.requires_grad
    trainable = [n for n, p in fm.named_parameters() if p.requires_grad]
    assert trainable and all(L.is_lora_name(n) for n in trainable)

    # Two optimiser steps (the second moves A too: B is no longer zero), then the base is unchanged.
    before = {n: p.detach().clone() for n, p in fm.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (2, 24), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], 1)
    for _ in range(2):
        loss_sum, n = fm.train()(tokens, labels=labels)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    for n, p in fm.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert (fm.lm_head.weight is fm.embed_tokens.weight) == a.tie_embeddings
    assert all(float(m.lora_B.weight.detach().abs().min()) > 0 for _, m in L.lora_modules(fm))

    adapter = L.save_adapter(fm.state_dict(), fm.lora_config, tmp_path / "adapter", base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["bias"] == "none" and sorted(cfg["target_modules"]) == sorted(SEVEN) and cfg["modules_to_save"] is None
    keys = [k for k, _ in iter_safetensors(adapter / "adapter_model.safetensors")]
    assert len(keys) == 2 * 7 * a.n_layers and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no bias, no head

    ids = torch.randint(0, V, (2, 20), generator=g)
    with torch.no_grad():
        ours = fm.eval()(ids)
        ref_hf, hooked = hf_with_adapter(base, adapter)
        assert hooked == sorted("model." + n for n in expect)
        torch.testing.assert_close(ours, ref_hf(ids).logits, atol=1e-4, rtol=0)
        assert (ours - hf(ids).logits).abs().max() > 1e-3  # and the adapter matters
        try:
            import peft
        except ImportError:
            peft = None
        if peft is not None:
            base_hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            pm = peft.PeftModel.from_pretrained(base_hf, str(adapter)).eval()
            torch.testing.assert_close(ours, pm(ids).logits, atol=1e-4, rtol=0)

        # Merged: load_adapter(merge=True) folds the adapter into plain Linears (keeping the bias), and the merged
        # state saved as a checkpoint reopens in transformers with the same logits, the tied head stored once.
        merged = L.load_adapter(load_model(base, dtype=torch.float32), adapter, merge=True).eval()
        assert not L.lora_modules(merged)
        assert (merged.lm_head.weight is merged.embed_tokens.weight) == a.tie_embeddings
        torch.testing.assert_close(merged(ids), ours, atol=1e-4, rtol=0)
        out = save_checkpoint(fm, tmp_path / "merged", state_dict=L.merged_state(fm.state_dict(), fm.lora_config))
        names = [k for k, _ in iter_safetensors(out / "model.safetensors")]
        assert ("lm_head.weight" in names) != a.tie_embeddings
        assert not any(L.is_lora_name(k) for k in names)
        reopened = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert reopened.config.tie_word_embeddings == a.tie_embeddings
        torch.testing.assert_close(reopened(ids).logits, ours, atol=1e-4, rtol=0)
