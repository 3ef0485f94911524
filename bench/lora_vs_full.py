"""Does LoRA learn? The demo model trained briefly (a base that already answers in the prompt format, well
below its final accuracy), then continued from that same base for the same steps and seed with full
fine-tuning and with LoRA. Reports held-out greedy accuracy (the trainer's own evaluation: the same 100
procedural held-out problems) of base, full and LoRA, and LoRA's share of full fine-tuning's gain.

    python bench/lora_vs_full.py [--base-steps 300] [--steps 200] [--threads 2]

Writes bench/results/lora_cpu.json (with the machine load beside the figures).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-steps", type=int, default=300, help="demo steps that make the base")
    ap.add_argument("--steps", type=int, default=200, help="steps of each continuation (full and LoRA)")
    ap.add_argument("--full-lr", type=float, default=1e-3, help="peak lr of full fine-tuning")
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="peak lr of LoRA (1e-2 diverged here: loss 0.2 -> 0.9 by step 41)")
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--eval-problems", type=int, default=100, help="held-out problems for greedy accuracy")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--work", default=None, help="work directory; finished base/full runs in it are reused")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_cpu.json"), help="result JSON")
    a = ap.parse_args(argv)

    from fastmath.synth.procedural import SMALL_SPEC  # the single-digit problems its recorded results used
    from fastmath.train import TrainConfig, train

    load0 = os.getloadavg()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="fastmath-lora-bench-"))
    common = {"procedural": SMALL_SPEC, "threads": a.threads, "progress": False, "eval_problems": a.eval_problems, "seed": 0}

    def done(name, steps):  # a finished run of the same length in the work directory
        f = work / name / "latest" / "summary.json"
        if f.is_file() and json.loads(f.read_text())["steps"] == steps:
            return json.loads(f.read_text())
        return None

    t0 = time.time()
    base = done("base", a.base_steps) or train(TrainConfig(out=str(work / "base"), max_steps=a.base_steps, **common),
                                                log=lambda m: None)
    base_dir = Path(base["run_dir"]) / "final"
    t1 = time.time()
    full = done("full", a.steps) or train(TrainConfig(model=str(base_dir), out=str(work / "full"), max_steps=a.steps,
                                                      lr=a.full_lr, **common), log=lambda m: None)
    t2 = time.time()
    lora = train(TrainConfig(model=str(base_dir), out=str(work / "lora"), max_steps=a.steps, lr=a.lora_lr,
                             lora_rank=a.lora_rank, lora_targets="q,k,v,o,gate,up,down", **common), log=lambda m: None)
    t3 = time.time()
    b, f, l_ = full["untrained_greedy_acc"], full["greedy_acc"], lora["greedy_acc"]
    assert lora["untrained_greedy_acc"] == b  # both continuations start from the same base
    res = {"base_steps": a.base_steps, "steps": a.steps, "full_lr": a.full_lr, "lora_lr": a.lora_lr,
           "lora_rank": a.lora_rank, "lora_targets": "q,k,v,o,gate,up,down", "eval_problems": a.eval_problems,
           "base_greedy_acc": b, "full_greedy_acc": f, "lora_greedy_acc": l_,
           "full_val_loss": full["val_loss"], "lora_val_loss": lora["val_loss"], "base_val_loss_note":
           "base val loss = the base run's final val_loss", "base_val_loss": base["val_loss"],
           "lora_share_of_full_gain": (l_ - b) / (f - b) if f != b else None,
           "train_seconds": {"base": base["train_seconds"], "full": full["train_seconds"],
                             "lora": lora["train_seconds"]}, "threads": a.threads,
           "loadavg_before": load0, "loadavg_after": os.getloadavg(), "work_dir": str(work)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
