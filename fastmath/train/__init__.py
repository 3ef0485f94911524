"""`fastmath train`: packed-sequence SFT (and pre-training) of LLaMA-2 models, full or LoRA, on one CPU/GPU or
under torchrun + FSDP2. One file per job:

    config.py          TrainConfig (every option), validate, resolve_config, resume rules
    data.py            examples -> tokenizer -> tokenized train / held-out documents and eval problems
    trainer.py         Trainer: set-up, the training step top to bottom, one try/finally teardown; train()
    checkpointing.py   Checkpointer: atomic save, retention, exact resume (RNG, data cursor), final export
    evaluate.py        validation loss and held-out greedy accuracy
    loggers.py         metrics.jsonl, TensorBoard, Weights & Biases (--report-to)
    lora.py            LoRA adapters, PEFT-format files, merging

A run lives in `runs/<timestamp>/` (see fastmath.runs): config.json (resolved, with versions and git commit),
metrics.jsonl, checkpoints/step_N/ (HF layout or PEFT adapter + trainer_state/ for exact resume), final/,
loss.png; `runs/latest` points at the newest run.
"""
from ..grading import extract_answer
from ..runs import find_run_dir, list_checkpoints, new_run_dir, point_latest, versions, write_json_atomic
from ..synth.procedural import parse_procedural
from .config import (DEMO, RESUME_OVERRIDABLE, TrainConfig, check_resume_overrides, config_fields, load_config_file,
                     resolve_config, validate)
from .data import Prepared, prepare_data
from .evaluate import answers_match, greedy_accuracy, validation_loss
from .trainer import (Trainer, TrainingDiverged, accumulate_gradients, estimate_memory, flops_per_token,
                      format_summary, lr_at, peak_flops, train)

__all__ = ["DEMO", "RESUME_OVERRIDABLE", "Prepared", "Trainer", "TrainConfig", "TrainingDiverged",
           "accumulate_gradients", "answers_match", "check_resume_overrides", "config_fields", "estimate_memory",
           "extract_answer", "find_run_dir", "flops_per_token", "format_summary", "greedy_accuracy",
           "list_checkpoints", "load_config_file", "lr_at", "new_run_dir", "parse_procedural", "peak_flops",
           "point_latest", "prepare_data", "resolve_config", "train", "validate", "validation_loss", "versions",
           "write_json_atomic"]
