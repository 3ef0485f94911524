"""LLaMA-3.x, Mistral and Qwen2 checkpoints against transformers on the same random weights.

Tiny random configs cover MHA and GQA, tied and untied embeddings, Qwen2's q/k/v biases, an explicit head_dim,
Mistral v0.1's sliding window (within it) and LLaMA-3.1's llama3 rope scaling exercised past its original
context (16 positions here, sequences up to 40). Each loads with fastmath.load_model from what transformers
saved, and what fastmath saves reopens in transformers with equal logits.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastmath  # noqa: E402
from fastmath.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from family_util import FAMILIES, V, make_hf  # noqa: E402 (shared builders)

@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    kind = request.param
    hf = make_hf(kind)
    path = tmp_path_factory.mktemp(kind)
    sharded = kind == "mistral-mha"
    hf.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")
    assert (path / "model.safetensors.index.json").exists() == sharded
    fm = fastmath.load_model(path).eval()
    return kind, hf, fm, path


def test_loaded_args_follow_the_config(pair):
    kind, hf, fm, _ = pair
    a, c = fm.args, hf.config
    assert a.model_type == c.model_type
    assert a.head_dim == (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    assert a.tie_embeddings == c.tie_word_embeddings
    assert (fm.lm_head.weight is fm.embed_tokens.weight) == c.tie_word_embeddings
    assert a.qkv_bias == (kind.startswith("qwen2")) and (fm.layers[0].self_attn.q_proj.bias is not None) == a.qkv_bias
    assert sum(p.numel() for p in fm.parameters()) == sum(p.numel() for p in hf.parameters()) == a.num_params()
    assert a.sliding_window == (4096 if kind == "mistral-mha" else None)
    assert (a.rope_scaling or {}).get("rope_type") == ("llama3" if kind.startswith("llama3") else None)


def test_padded_logits_match(pair):
    _, hf, fm, _ = pair
    tokens = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))  # past 16: scaled rope
    with torch.no_grad():
        ref = hf(tokens).logits
        out = fm(tokens)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_packed_logits_match_separate_forwards(pair):
    _, hf, fm, _ = pair
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (5, 1, 33, 8)]
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    cu = torch.tensor([0, 5, 6, 39, 47], dtype=torch.int32)
    with torch.no_grad():
        out = fm(torch.cat(docs), positions=positions, cu_seqlens=cu, max_seqlen=33)
        ref = torch.cat([hf(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_loss_matches_transformers(pair):
    _, hf, fm, _ = pair
    tokens = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(3))
    hf_labels = tokens.clone()
    hf_labels[0, :7] = -100
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = hf_labels[:, 1:]
    with torch.no_grad():
        ref = hf(tokens, labels=hf_labels).loss
        loss_sum, n = fm(tokens, labels=labels)
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-5, rtol=1e-5)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forwards (no cache): the plainest reference for fastmath's own model."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_continuation_matches_transformers(pair):
    _, hf, fm, _ = pair
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(4)
    for n in (3, 9):
        prompt = torch.randint(3, V, (n,), generator=g).tolist()
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, n:]
        assert greedy(fm, prompt, 20) == ref.tolist()


def test_save_reopens_in_transformers_with_equal_logits(pair, tmp_path):
    kind, hf, fm, _ = pair
    save_checkpoint(fm, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [FAMILIES[kind][1]]
    reopened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reopened) is type(hf)
    if fm.args.tie_embeddings:  # stored once, as transformers stores it
        from safetensors import safe_open

        with safe_open(tmp_path / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()
    tokens = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reopened(tokens).logits, fm(tokens), atol=1e-4, rtol=0)
    assert fastmath.load_model(tmp_path).args == fm.args


def test_older_config_spellings_load_the_same_model(pair, tmp_path):
    """rope_theta/rope_scaling {"type": ...}/torch_dtype (transformers 4.x) instead of rope_parameters/dtype."""
    kind, hf, fm, path = pair
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        rope["type"] = rope.pop("rope_type")
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert fastmath.load_model(tmp_path).args == fm.args


def test_sliding_window_is_enforced_not_ignored(tmp_path):
    hf = make_hf("mistral-mha")
    hf.config.sliding_window = 8
    hf.save_pretrained(tmp_path)
    fm = fastmath.load_model(tmp_path).eval()
    tokens = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fm(tokens), hf(tokens).logits, atol=1e-4, rtol=0)  # within the window: exact
        with pytest.raises(ValueError, match="9 tokens exceeds the model's sliding_window of 8"):
            fm(torch.randint(0, V, (1, 9)))


def test_qwen2_active_sliding_window_is_kept(tmp_path):
    hf = make_hf("qwen2-gqa")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("layer_types", None)
    active = {**cfg, "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(active))
    assert fastmath.load_model(tmp_path).args.sliding_window == 32  # layer 1 slides
    (tmp_path / "config.json").write_text(json.dumps({**active, "max_window_layers": 2}))
    assert fastmath.load_model(tmp_path).args.sliding_window is None  # no layer slides
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                                "rope_theta": 1e6}}))
    with pytest.raises(CheckpointError, match="rope scaling type 'yarn' is not supported"):
        fastmath.load_model(tmp_path)


def test_save_copies_a_tokenizer_json_with_its_template_and_eos_list(tmp_path):
    """save_checkpoint(tokenizer_path=base) writes tokenizer.json, the base's tokenizer_config.json (chat template)
    and generation_config.json (the EOS list): transformers reopens the same tokenizer and stops on every EOS."""
    from family_util import make_llama3

    base = tmp_path / "base"
    eos = make_llama3(base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}))
    hf = make_hf("llama3-gqa-tied")
    hf.resize_token_embeddings(len(json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]) + 16)
    hf.save_pretrained(tmp_path / "model")
    fm = fastmath.load_model(tmp_path / "model")
    out = save_checkpoint(fm, tmp_path / "final", tokenizer_path=base)
    assert not (out / "tokenizer.model").exists()
    ref_base, ref = (transformers.AutoTokenizer.from_pretrained(p) for p in (base, out))
    text = "Sam has 3 apples.\nThe answer is: 3"
    assert ref(text).input_ids == ref_base(text).input_ids == fastmath.Tokenizer(out).encode(text)
    assert ref.chat_template == ref_base.chat_template
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert sorted(gen.eos_token_id) == sorted(eos)
    assert sorted(json.loads((out / "config.json").read_text())["eos_token_id"]) == sorted(eos)
