import pytest

from fastmath.config import PRESETS, ModelArgs, get_preset


@pytest.mark.parametrize("name,dim,layers,heads,kv,inter,params_b", [
    ("llama2-7b", 4096, 32, 32, 32, 11008, 6.74),
    ("llama2-13b", 5120, 40, 40, 40, 13824, 13.02),
    ("llama2-70b", 8192, 80, 64, 8, 28672, 68.98),
])
def test_llama2_presets_match_published_dimensions(name, dim, layers, heads, kv, inter, params_b):
    a = get_preset(name)
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.intermediate_size) == (dim, layers, heads, kv, inter)
    assert (a.vocab_size, a.norm_eps, a.rope_theta, a.head_dim) == (32000, 1e-5, 10000.0, 128)
    # Published parameter counts: 6.74B, 13.02B, 68.98B.
    assert abs(a.num_params() / 1e9 - params_b) < 0.01


def test_small_presets():
    assert 0.5e6 < get_preset("tiny").num_params() < 3e6  # the demo's model: minutes on 2 CPU cores
    t = get_preset("test")
    assert t.n_kv_heads < t.n_heads and t.num_params() < 1e6


def test_num_params_matches_model():
    from fastmath.model import Transformer, num_params

    for name in ("test", "tiny"):
        assert num_params(Transformer(get_preset(name))) == get_preset(name).num_params()


def test_presets_are_copies_and_errors_are_clear():
    a = get_preset("test")
    a.dim = 1
    assert PRESETS["test"].dim == 64
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="not divisible"):
        ModelArgs(dim=100, n_heads=3)


# Published sizes (the model cards on the Hugging Face hub: 8.03B, 1.24B, 7.25B, 7.61B, 1.54B).
NEW_PRESETS = [("llama3.1-8b", 8.03), ("llama3.2-1b", 1.24), ("mistral-7b", 7.25), ("qwen2.5-7b", 7.61),
               ("qwen2.5-1.5b", 1.54)]


@pytest.mark.parametrize("name,params_b", NEW_PRESETS)
def test_family_presets_match_published_counts_and_transformers(name, params_b):
    """Each preset's parameter count: the published one, and exactly that of transformers' model built (on the
    meta device) from the config.json fastmath writes for it, so the family switches land where HF has them."""
    import torch

    transformers = pytest.importorskip("transformers")
    from fastmath.checkpoint import args_to_hf_config
    from fastmath.model import Transformer, num_params

    a = get_preset(name)
    assert abs(a.num_params() / 1e9 - params_b) < 0.01
    cfg = args_to_hf_config(a, torch.bfloat16)
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        ours = Transformer(a)
    assert type(hf).__name__ == cfg["architectures"][0]
    assert sum(p.numel() for p in hf.parameters()) == num_params(ours) == a.num_params()


def test_llama3_inv_freq_is_transformers():
    import torch

    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fastmath.checkpoint import args_to_hf_config
    from fastmath.kernels import rotary_inv_freq

    for name in ("llama3.1-8b", "llama3.2-1b"):
        a = get_preset(name)
        hf_cfg = transformers.AutoConfig.for_model(**args_to_hf_config(a, torch.float32))
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
        ours = rotary_inv_freq(a.head_dim, a.rope_theta, scaling=a.rope_scaling)
        assert torch.equal(ours, ref)
        assert not torch.equal(ours, rotary_inv_freq(a.head_dim, a.rope_theta))  # the scaling did something


def test_args_switches_are_validated():
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        ModelArgs(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="needs low_freq_factor"):
        ModelArgs(rope_scaling={"type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    assert ModelArgs(rope_scaling={"type": "default"}).rope_scaling is None
    assert ModelArgs(dim=64, n_heads=4, head_dim=24).head_dim == 24
    assert ModelArgs(dim=64, n_heads=4, head_dim=24).replace(n_heads=8).head_dim == 8  # derived again
