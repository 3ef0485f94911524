import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmath
from fastmath.checkpoint import CheckpointError, save_checkpoint
from fastmath.tokenizer import train_tokenizer

TEXTS = [f"Ann has {i} pens. The answer is: {i}" for i in range(100)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    tok = train_tokenizer(TEXTS, path.parent / "tok.model", vocab_size=300)
    model = fastmath.load_model("test")
    assert model.args.vocab_size == 512  # a tokenizer (300) smaller than the model's vocab is fine
    save_checkpoint(model, path, tokenizer_path=tok.path)
    return model, path


def test_round_trip_and_transformers_opens_it(saved):
    model, path = saved
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= names
    cfg = json.loads((path / "config.json").read_text())
    # both spellings written, for old and new transformers
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    tokens = torch.randint(0, 512, (2, 11))
    loaded = fastmath.load_model(path)
    hf = pytest.importorskip("transformers").LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spelling", ["old", "new"])
def test_config_spellings(saved, tmp_path, spelling):
    model, path = saved
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    if spelling == "old":
        del cfg["rope_parameters"], cfg["dtype"]
        cfg["rope_theta"] = 500000.0
        cfg["torch_dtype"] = "bfloat16"
    else:
        del cfg["rope_theta"], cfg["torch_dtype"]
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
        cfg["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = fastmath.load_model(tmp_path)
    assert loaded.args.rope_theta == 500000.0
    assert loaded.lm_head.weight.dtype == torch.bfloat16  # the checkpoint's dtype by default
    assert fastmath.load_model(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_sharded_save(saved, tmp_path):
    model, _ = saved
    save_checkpoint(model, tmp_path, max_shard_size=60_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = fastmath.load_model(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b, a.to(torch.bfloat16), atol=0, rtol=0, msg=n)


def copy_dir(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_inputs_are_one_clear_sentence(saved, tmp_path):
    model, path = saved
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a preset"):
        fastmath.load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config.json: file not found"):
        fastmath.load_model(empty)
    (tmp_path / "bad").mkdir()
    bad = copy_dir(path, tmp_path / "bad")
    (bad / "config.json").write_text('{"hidden_size": 64,\n oops}')
    with pytest.raises(CheckpointError, match=r"config.json: malformed JSON at line 2"):
        fastmath.load_model(bad)
    cfg = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 200}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape \(64, 192\), the config implies \(64, 200\)"):
        fastmath.load_model(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers.2"):
        fastmath.load_model(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(CheckpointError, match="model_type 'gemma' is not supported"):
        fastmath.load_model(bad)
    # Variants that would change the math are refused by name, never ignored.
    for change, named in [({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
                          ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope scaling type 'linear'"),
                          ({"attention_bias": True}, "attention_bias: true"),
                          ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                          ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
                          ({"layer_types": ["chunked_attention"] * 2}, "layer type.*'chunked_attention'"),
                          ({"architectures": ["GemmaForCausalLM"]}, "architecture 'GemmaForCausalLM'")]:
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=f"config.json: {named}"):
            fastmath.load_model(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        fastmath.load_model(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        fastmath.load_model(bad)


def test_tokenizer_vocab_mismatch(saved, tmp_path):
    model, _ = saved
    big = train_tokenizer(TEXTS + [chr(0x4E00 + i) for i in range(300)], tmp_path / "big.model", vocab_size=600)
    with pytest.raises(ValueError, match="tokenizer has 600 tokens but the model has a vocabulary of 512"):
        save_checkpoint(model, tmp_path / "out", tokenizer_path=big.path)


LOAD_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import fastmath
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = fastmath.load_model(sys.argv[1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert model.lm_head.weight.dtype == torch.bfloat16
    print((after - before) * 1024)
""")


def test_loading_peak_memory_stays_under_1_5x_checkpoint(tmp_path):
    """A 1.1 GB bf16 checkpoint in one file: loading raises peak RSS by less than 1.5x its size."""
    from fastmath.config import ModelArgs
    from fastmath.model import Transformer

    args = ModelArgs(dim=2048, n_layers=8, n_heads=16, vocab_size=32000)
    with torch.device("meta"):
        meta = Transformer(args)
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
             for n, p in meta.named_parameters()}
    meta.args = args
    save_checkpoint(meta, tmp_path, state_dict=state, dtype=torch.bfloat16)
    del state
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size >= 1e9
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    increase = int(out.stdout.strip().splitlines()[-1])
    assert increase < 1.5 * size, f"peak RSS rose by {increase / 1e9:.2f} GB for a {size / 1e9:.2f} GB checkpoint"
