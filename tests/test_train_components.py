"""The trainer's pieces: the explicit kernel switch (no process-wide environment write), the Python API's
option checks, and the one checkpoint-directory definition shared by train, sample and serve."""
import os
from pathlib import Path

import pytest
import torch

from fastmath import runs
from fastmath import train as T
from fastmath.kernels import kernels_flag, kernels_mode, use_triton
from fastmath.synth.procedural import SMALL_SPEC


def test_kernels_mode_is_scoped_and_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("FASTMATH_KERNELS", "0")
    assert kernels_flag() == "0"
    with kernels_mode("auto"):
        assert kernels_flag() == ""
        with kernels_mode("off"):
            assert kernels_flag() == "0" and not use_triton(torch.zeros(1))
        assert kernels_flag() == ""
    assert kernels_flag() == "0" and os.environ["FASTMATH_KERNELS"] == "0"
    with pytest.raises(ValueError, match="on, off, auto"):
        with kernels_mode("fast"):
            pass


def test_training_leaves_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTMATH_KERNELS", raising=False)
    seen = []


    def fit(self):
        seen.append(kernels_flag())  # the run's choice is in force inside the run
        return {"run_dir": "x"}

    monkeypatch.setattr(T.trainer.Trainer, "fit", fit)
    T.train(T.TrainConfig(model="test", kernels="off", out=str(tmp_path), procedural=SMALL_SPEC, procedural_examples=200, val_examples=4,
                          eval_problems=0, max_steps=1, threads=1, progress=False, tokenizer_vocab=400))
    assert seen == ["0"] and "FASTMATH_KERNELS" not in os.environ



def test_python_api_gets_the_cli_checks():
    for bad, match in (({"over_length": "cut"}, "--over-length"), ({"dtype": "fp8"}, "--dtype"),
                       ({"warmup": 1.5}, "--warmup"), ({"report_to": ["mlflow"]}, "--report-to"),
                       ({"lora_rank": -1}, "--lora-rank"), ({"lora_rank": 2, "lora_dropout": 1.0}, "--lora-dropout")):
        with pytest.raises(ValueError, match=match):
            T.train(T.TrainConfig(**bad))


def test_one_checkpoint_directory_definition(tmp_path):
    from fastmath.sample_io import SampleError, resolve_model

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    assert not runs.is_checkpoint(step)  # no weights yet: not a checkpoint
    (step / "model.safetensors").write_bytes(b"")
    assert runs.is_checkpoint(step) and not runs.is_resumable(step)
    assert resolve_model(run) == (step.resolve(), run.resolve())
    adapter = run / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert runs.is_adapter(adapter) and resolve_model(run) == (adapter.resolve(), run.resolve())
    with pytest.raises(SampleError, match="neither a checkpoint"):
        resolve_model(tmp_path)
    assert T.parse_procedural("max_steps=3").max_steps == 3  # lives next to the generator now
    from fastmath.synth.procedural import parse_procedural
    assert parse_procedural is T.parse_procedural


def test_engine_greedy_decode_matches_a_full_recompute_reference(tmp_path):
    """The trainer's greedy evaluation (the engine at temperature 0) gives the tokens of argmax decoding by
    full recomputation, for prompts of different lengths decoded together."""
    import sys

    from fastmath.config import get_preset
    from fastmath.model import Transformer
    from fastmath.synth.procedural import SMALL_CONFIG, generate
    from fastmath.tokenizer import train_tokenizer
    from fastmath.train.evaluate import greedy_decode

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine_fixture import greedy_reference

    torch.set_num_threads(1)
    recs = generate(200, SMALL_CONFIG, seed=3)
    tok = train_tokenizer([r["question"] + "\n" + r["solution"] for r in recs], tmp_path / "t.model", vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(get_preset("test").replace(vocab_size=tok.vocab_size)).eval()
    model.init_weights(0.2)
    prompts = [tok.encode(r["question"], bos=True) for r in recs[:5]]
    got = greedy_decode(model, tok, prompts, 12)
    for p, g in zip(prompts, got):
        assert g["token_ids"] == greedy_reference(model, p, 12, tok.eos_id)
