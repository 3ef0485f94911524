"""Where a run's metrics go: metrics.jsonl always; TensorBoard and Weights & Biases on request (--report-to).

Each record is a dict with `step` and any of: loss, lr, grad_norm, tokens_per_s, mfu (GPU), val_loss,
greedy_acc (plus bookkeeping fields that only metrics.jsonl keeps). TensorBoard event files go in the run
directory; W&B writes under the run directory too, offline when no API key is configured (sync later with
`wandb sync`). Both are optional extras, imported only when asked for, with a clear message when missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import fsio

# metrics.jsonl key -> the name shown in TensorBoard / W&B
SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
           "mfu": "train/mfu", "val_loss": "eval/val_loss", "greedy_acc": "eval/greedy_acc"}


class MissingExtra(ValueError):
    pass


class JsonlLogger:
    """metrics.jsonl, appended line by line (fsio.AppendFile: a full disk raises fsio.StorageError)."""

    def __init__(self, path: Path):
        self.file = fsio.AppendFile(path)

    def log(self, rec: dict) -> None:
        self.file.append(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingExtra("--report-to tensorboard needs the tensorboard package: "
                               "pip install 'fastmath[tensorboard]' (or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(run_dir))

    def log(self, rec: dict) -> None:
        for k, tag in SCALARS.items():
            if rec.get(k) is not None:
                self.writer.add_scalar(tag, float(rec[k]), int(rec["step"]))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            raise MissingExtra("--report-to wandb needs the wandb package: pip install 'fastmath[wandb]' "
                               "(or pip install wandb)") from None
        mode = os.environ.get("WANDB_MODE")
        if mode is None:  # not logged in: record offline rather than prompt or fail
            try:
                logged_in = bool(wandb.api.api_key)
            except Exception:
                logged_in = False
            mode = "online" if logged_in else "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastmath"), name=name, dir=str(run_dir),
                              config=config, mode=mode, reinit=True)

    def log(self, rec: dict) -> None:
        vals = {tag: float(rec[k]) for k, tag in SCALARS.items() if rec.get(k) is not None}
        if vals:
            self.run.log(vals, step=int(rec["step"]))

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """All of a run's loggers behind one `log(rec)`; only rank 0 builds any."""

    def __init__(self, run_dir: Path, report_to, config: dict, enabled: bool):
        self.loggers = []
        if not enabled:
            return
        self.loggers.append(JsonlLogger(run_dir / "metrics.jsonl"))
        try:
            for r in dict.fromkeys(report_to):
                if r == "tensorboard":
                    self.loggers.append(TensorBoardLogger(run_dir))
                elif r == "wandb":
                    self.loggers.append(WandbLogger(run_dir, config, run_dir.name))
        except BaseException:
            self.close()
            raise

    def log(self, rec: dict) -> None:
        for lg in self.loggers:
            lg.log(rec)

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for lg in loggers:
            try:
                lg.close()
            except Exception:
                pass
