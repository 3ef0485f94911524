"""`fastmath train --dry-run` on the family presets: the estimate sizes the published model (tied head counted
once, q/k/v biases, GQA's k/v, explicit head_dim), checked against the published counts and transformers'
models built on the meta device from the config fastmath writes."""
import pytest
import torch

from fastmath import train as T
from fastmath.config import get_preset

from test_config import NEW_PRESETS

transformers = pytest.importorskip("transformers")

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_meta(args):
    from fastmath.checkpoint import args_to_hf_config

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**args_to_hf_config(args, torch.bfloat16)))


@pytest.mark.parametrize("name,params_b", NEW_PRESETS)
def test_dry_run_sizes_each_published_preset(name, params_b, procedural_tok, tmp_path):
    opts = dict(model=name, tokenizer=str(procedural_tok.path), procedural_examples=40, val_examples=4,
                eval_problems=0, micro_batch_tokens=2048, batch_tokens=4096, progress=False, out=str(tmp_path))
    s = T.train(T.TrainConfig(**opts), dry_run=True)
    a = get_preset(name)
    hf = hf_meta(a)
    assert s["params"] == sum(p.numel() for p in hf.parameters())  # tied: counted once, as the module has it
    assert abs(s["params"] / 1e9 - params_b) < 0.01  # the published size, not one re-sized to the tokenizer
    # One block, as FSDP gathers it (biases, GQA k/v, head_dim): what the estimate adds for 2 ranks.
    block = sum(p.numel() for p in hf.model.layers[0].parameters())
    cfg = T.resolve_config(T.TrainConfig(**opts), False, 2)
    one, two = T.estimate_memory(a, cfg, 1), T.estimate_memory(a, cfg, 2)
    assert one["states_gb"] == pytest.approx(16 * s["params"] / 2**30)
    gathered = (two["total_gb"] - two["states_gb"] - two["activations_gb"]) * 2**30
    assert gathered == pytest.approx(2 * 2 * block)
    assert s["memory_gb"] == pytest.approx(one["total_gb"])
    # LoRA on all seven projections: the adapter size of every Linear of transformers' model.
    lora = T.train(T.TrainConfig(**opts, lora_rank=8, lora_targets="q,k,v,o,gate,up,down"), dry_run=True)
    expect = sum(8 * (m.in_features + m.out_features) for n, m in hf.named_modules() if n.rsplit(".", 1)[-1] in SEVEN)
    assert lora["lora_params"] == expect


def test_a_tokenizer_larger_than_the_preset_vocabulary_is_refused(procedural_tok, tmp_path):
    from fastmath.config import PRESETS

    PRESETS["small-vocab"] = get_preset("test").replace(vocab_size=100)  # a published-style preset (vocab kept)
    try:
        with pytest.raises(ValueError, match="tokenizer has 400 tokens but the preset small-vocab has a vocabulary of 100"):
            T.train(T.TrainConfig(model="small-vocab", tokenizer=str(procedural_tok.path), procedural_examples=40,
                                  val_examples=4, eval_problems=0, progress=False, out=str(tmp_path)), dry_run=True)
    finally:
        del PRESETS["small-vocab"]
