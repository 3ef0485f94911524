"""Run directories: `runs/<timestamp>/` (config.json, metrics.jsonl, checkpoints/step_N/, final/), the
`latest` link, and the one definition of a checkpoint directory that train, sample, grade and serve share."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import fsio

class RunError(ValueError):
    """A path that is not the run or checkpoint directory it was given as; the message names it."""


def is_model_path(model: str) -> bool:
    """--model names a directory (to load and fine-tune), not a preset (to build from scratch)."""
    return Path(model).is_dir()


def is_checkpoint(p: Path) -> bool:
    """THE definition of a checkpoint directory: a Hugging Face LLaMA layout (config.json + model*.safetensors).
    Train writes them (checkpoints/step_N/, final/); sample, grade, serve and fine-tuning read them."""
    p = Path(p)
    return (p / "config.json").is_file() and any(p.glob("model*.safetensors"))


def is_adapter(p: Path) -> bool:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    p = Path(p)
    return (p / "adapter_config.json").is_file() and (p / "adapter_model.safetensors").is_file()


def is_resumable(p: Path) -> bool:
    """A checkpoint the trainer can continue exactly from (its trainer_state/ is complete)."""
    return (Path(p) / "trainer_state" / "state.json").is_file()


def resolve_model(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(checkpoint directory, run directory or None) for a --model argument of sample, grade or serve.

    A run directory gives its `final/`, else its newest `checkpoints/step_N/`; a checkpoint (or adapter)
    directory is used as it is (its run directory is found when it sits in one).
    """
    p = Path(path)
    if not p.exists():
        hint = " (train one first: `fastmath train`)" if str(path).rstrip("/").endswith("latest") else ""
        raise RunError(f"{path}: no such run or checkpoint directory{hint}")
    p = p.resolve()
    if is_checkpoint(p) or is_adapter(p):
        if p.name == "final" or p.name == "adapter":
            return p, p.parent
        if p.name.startswith("step_") and p.parent.name == "checkpoints":
            return p, p.parent.parent
        return p, None
    for name in ("final", "adapter"):
        if is_checkpoint(p / name) or is_adapter(p / name):
            return p / name, p
    steps = sorted((int(c.name[5:]), c) for c in (p / "checkpoints").glob("step_*")
                   if c.name[5:].isdigit() and (is_checkpoint(c) or is_adapter(c)))
    if steps:
        return steps[-1][1], p
    raise RunError(f"{path}: neither a checkpoint directory (config.json + model.safetensors), an adapter "
                   "directory (adapter_config.json) nor a run directory with final/ or checkpoints/step_N/")


# ----------------------------------------------------------------------------------------------------------
# Run directory helpers


def versions() -> dict:
    import torch

    import fastmath

    out = {"fastmath": fastmath.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
           "numpy": np.__version__}
    for name in ("triton", "transformers", "sentencepiece"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    repo = Path(__file__).resolve().parents[1]  # the source tree (for the git commit)
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["git_commit"] = (commit + ("-dirty" if dirty else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def new_run_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run directory in {parent}")


def point_latest(run_dir: Path) -> None:
    """runs/latest -> run_dir (relative symlink, replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def write_json_atomic(path: Path, obj) -> None:
    """path holds the old JSON or the new one, never a part (fsio.StorageError when it cannot be written)."""
    fsio.atomic_write_json(path, obj)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    out = []
    for p in (run_dir / "checkpoints").glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit() and is_resumable(p):
            out.append((int(p.name[5:]), p))
    return sorted(out)


def find_run_dir(resume: str) -> Path:
    """A run directory from --resume: a run dir, 'latest' / a runs dir holding 'latest', or a step_N dir."""
    p = Path(resume)
    if resume == "latest":
        p = Path("runs") / "latest"
    if (p / "latest").exists() and not (p / "config.json").exists():
        p = p / "latest"
    if p.name.startswith("step_") and p.parent.name == "checkpoints":
        p = p.parent.parent
    p = p.resolve()
    if not (p / "config.json").is_file():
        raise ValueError(f"{resume}: not a fastmath run directory (no config.json)")
    return p


