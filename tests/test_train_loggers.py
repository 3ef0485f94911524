"""--report-to: TensorBoard event files in the run directory (read back with tensorboard's EventAccumulator)
and an offline W&B run whose summary holds the last values; metrics.jsonl is always written."""
import json
from pathlib import Path

import pytest
import torch

from fastmath import data as D
from fastmath import train as T
from fastmath.synth.procedural import SMALL_CONFIG, SMALL_SPEC, generate
from fastmath.tokenizer import train_tokenizer

OPTS = {"model": "test", "procedural": SMALL_SPEC, "procedural_examples": 300, "val_examples": 8, "eval_problems": 4, "eval_max_new_tokens": 8,
        "micro_batch_tokens": 1024, "batch_tokens": 1024, "max_steps": 3, "eval_every": 2, "threads": 1,
        "progress": False}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    recs = generate(300, SMALL_CONFIG, seed=9)
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    train_tokenizer([D.render_prompt(r["question"]) for r in recs] + [r["solution"] for r in recs], path, 400)
    return path


def wandb_records(path):
    """The protobuf Records of an offline run's .wandb transaction log: a ':W&B' header (7 bytes), then a
    LevelDB-style log (32 KiB blocks; each chunk: crc32 (4), length (2), type (1): full / first / middle / last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's padding trailer
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and buf:  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def test_tensorboard_and_wandb_get_the_metrics(tmp_path, tok_path, monkeypatch):
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    s = T.train(T.TrainConfig(out=str(tmp_path / "runs"), tokenizer=str(tok_path), report_to=["tensorboard", "wandb"],
                              **OPTS))
    run = Path(s["run_dir"])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = {}
    for r in recs:
        last.update({k: (r["step"], v) for k, v in r.items() if k != "step" and v is not None})

    ea = EventAccumulator(str(run))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                     ("tokens_per_s", "train/tokens_per_s"), ("val_loss", "eval/val_loss"),
                     ("greedy_acc", "eval/greedy_acc")):
        assert tag in tags, (tag, tags)
        ev = ea.Scalars(tag)[-1]
        assert ev.step == last[key][0] and ev.value == pytest.approx(last[key][1], rel=1e-6), (tag, ev, last[key])
    assert len(ea.Scalars("train/loss")) == 3 and len(ea.Scalars("eval/val_loss")) == 2  # step 2 and the end

    logs = list(run.glob("wandb/offline-run-*/run-*.wandb"))  # the offline run lives in the run directory
    assert len(logs) == 1, list(run.rglob("*"))
    summary = {}
    for r in wandb_records(logs[0]):
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    for key, tag in (("loss", "train/loss"), ("val_loss", "eval/val_loss"), ("greedy_acc", "eval/greedy_acc")):
        assert summary[tag] == pytest.approx(last[key][1], rel=1e-6)


def test_report_to_is_checked_and_missing_extras_say_how_to_install(tmp_path, tok_path, monkeypatch):
    with pytest.raises(ValueError, match="--report-to"):
        T.train(T.TrainConfig(report_to=["mlflow"]))
    import builtins

    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(ValueError, match=r"pip install 'fastmath\[tensorboard\]'"):
        T.train(T.TrainConfig(out=str(tmp_path / "runs"), tokenizer=str(tok_path), report_to=["tensorboard"],
                              **{**OPTS, "eval_problems": 0}))
