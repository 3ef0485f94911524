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
    assert 2e6 < get_preset("tiny").num_params() < 10e6
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
