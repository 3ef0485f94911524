"""The Trainer: set-up, then a training loop that reads top to bottom, with one try/finally for teardown.

One optimizer step = `accum` packed micro-batches per rank (`world_size * accum` packs in all, a token
budget each). The loss of a step is the sum of per-token cross-entropies over every target token of the
whole global batch divided by that count (known before the forward, from the labels), so micro-batch and
rank splits do not change the gradient.

The pieces it hands off to: config.py (options, validation, defaults), data.py (examples -> tokenized
train / held-out), checkpointing.py (save, retention, exact resume, export), evaluate.py (validation loss,
greedy accuracy), loggers.py (metrics.jsonl, TensorBoard, W&B), lora.py (adapters), fastmath.runs (run
directories and `latest`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from .. import data as D
from .. import fsio
from ..runs import find_run_dir, is_model_path, new_run_dir, point_latest, versions, write_json_atomic
from .config import TrainConfig, check_resume_overrides, resolve_config, validate
from .data import prepare_data
from .evaluate import _autocast, greedy_accuracy, validation_loss


class TrainingDiverged(RuntimeError):
    pass


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    warm = max(1, math.ceil(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def flops_per_token(args, mean_sq_len: float) -> float:
    """Training FLOPs per token: 6 * non-embedding params + attention (12 * layers * heads * head_dim * L),
    with L = sum(len^2) / sum(len) of the packed documents (causal attention within documents)."""
    n = args.num_params(embeddings=False)
    return 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * mean_sq_len


def peak_flops(dev) -> float | None:
    """Dense bf16 peak of the GPU (H100/H200: 989 TFLOP/s); None when unknown."""
    import torch

    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return 989e12 if ("H100" in name or "H200" in name) else (312e12 if "A100" in name else None)


def estimate_memory(args, cfg: TrainConfig, world_size: int) -> dict:
    """Rough bytes per GPU: fp32 master weights, grads and Adam moments (sharded over ranks; a tied head is
    the embedding, counted once), bf16 gathered weights of one block (q/k/v biases, GQA's narrower k/v and an
    explicit head_dim included), and activations of one micro-batch: the bf16 tensors a block keeps for
    backward, in bytes per token 8 * dim (norm inputs and outputs) + 4 * q_width + 4 * kv_width (q, k, v and
    the attention output) + 6 * intermediate (gate, up, their product), about Korthikanti et al.'s 34 * dim for
    LLaMA-2; ~2 * dim per layer with activation checkpointing, plus one block's worth.
    With LoRA: the frozen base in bf16 (2 bytes per parameter) and 16 bytes per adapter parameter."""
    p = args.num_params()
    states = 16 * p / world_size
    lora = None
    if cfg.lora_rank:
        from .lora import lora_memory

        lora = lora_memory(args, cfg.lora_rank, cfg.lora_targets, world_size)
        states = (lora["base_gb"] + lora["adapter_states_gb"]) * 2**30
    embeddings = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    per_layer = (p - embeddings - args.dim) / max(1, args.n_layers)  # one block (the final norm aside)
    gathered = 2 * per_layer * (2 if world_size > 1 else 0)
    t = cfg.micro_batch_tokens
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    act_layer = (8 * args.dim + 4 * q + 4 * kv + 6 * args.intermediate_size) * t
    acts = (2 * args.dim * t * args.n_layers + act_layer) if cfg.activation_checkpointing else act_layer * args.n_layers
    head = t * 4 * min(args.vocab_size, 4096)  # fused CE works in chunks
    out = {"params": p, "states_gb": states / 2**30, "activations_gb": (acts + head) / 2**30,
           "total_gb": (states + gathered + acts + head) / 2**30}
    if lora:
        out["lora_params"] = lora["adapter_params"]
    return out


def accumulate_gradients(model, batches: list[D.PackedBatch], n_total: int, dist_, dev, use_bf16: bool) -> float:
    """Forward/backward this rank's micro-batches of one step; returns this rank's summed loss.

    Each micro-batch's summed loss is divided by `n_total`, the target count of the whole global batch
    (all ranks, all micro-batches), and multiplied by the world size because FSDP averages gradients over
    ranks: the accumulated gradient is exactly that of (sum of all target losses) / n_total.
    """
    scale = dist_.world_size / max(1, n_total)
    total = 0.0
    for i, b in enumerate(batches):
        if dist_.fsdp:  # reduce-scatter gradients once per step, after the last micro-batch
            model.set_requires_gradient_sync(i == len(batches) - 1)
        with _autocast(dev) if use_bf16 else contextlib.nullcontext():
            loss_sum, _ = model(**b.to_torch(dev))
        (loss_sum * scale).backward()
        total += float(loss_sum.detach())
    return total


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.caught = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.caught is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        self.caught = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def train(cfg: TrainConfig, resume: str | None = None, dry_run: bool = False, log=None,
          resume_overrides: dict | None = None) -> dict:
    """Run (or resume) a training run and return its summary (also written to run_dir/summary.json).

    Args:
        cfg: the options (ignored when resuming: the run's own resolved config is used). Checked by
            config.validate (ValueError naming the option), as on the command line.
        resume: a run directory, 'latest', or a checkpoint directory of a run, to continue exactly.
        dry_run: print parameter count, estimated memory per GPU and steps, then return.
        resume_overrides: with `resume`, new values of RESUME_OVERRIDABLE options (threads, save_every, ...).
    Raises:
        fsio.StorageError: a checkpoint, export or log could not be written (full disk, I/O error); its one
            sentence names the step, the path and the last good checkpoint to --resume from.
    """
    from ..kernels import kernels_mode

    if resume:
        run_dir = find_run_dir(resume)
        check_resume_overrides(resume_overrides or {})
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = TrainConfig(**saved["config"]).replace(**(resume_overrides or {}))
    validate(cfg)
    trainer = Trainer(cfg, log=log)
    with kernels_mode(cfg.kernels):  # explicit, for this run only: no process-wide environment write
        return trainer.run(resume=resume, dry_run=dry_run)


class Trainer:
    def __init__(self, cfg: TrainConfig, log=None):
        self.cfg = cfg
        self._log = log or (lambda m: print(m, flush=True))
        self._closers: list = []  # torn down in reverse order on every exit (one try/finally in run)

    def say(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    def run(self, resume: str | None = None, dry_run: bool = False) -> dict:
        try:
            if not self.setup(resume, dry_run):
                return self.dry_run_summary
            return self.fit()
        finally:
            for close in reversed(self._closers):
                try:
                    close()
                except Exception:
                    pass

    # ------------------------------------------------------------------------------------------------------
    # Set-up: process group, run directory, data, model (+ LoRA), optimizer, checkpointer, loggers

    def setup(self, resume: str | None, dry_run: bool) -> bool:
        import torch

        from .. import distributed as dist_mod
        from ..checkpoint import load_model, read_model_args
        from ..config import TOKENIZER_VOCAB_PRESETS, get_preset
        from ..model import Transformer
        from .checkpointing import Checkpointer
        from .loggers import Loggers

        cfg = self.cfg
        if cfg.cpu_offload and (cfg.device == "cpu" or not torch.cuda.is_available()):
            raise ValueError("--cpu-offload moves FSDP shards between a GPU and host memory; it needs a GPU")
        if cfg.lora_rank and not is_model_path(cfg.model) and not dry_run:  # (a dry run may size a preset)
            raise ValueError(f"--lora-rank adapts a checkpoint: --model must be a checkpoint directory, not the "
                             f"preset {cfg.model!r}")
        self.dist = dist_ = dist_mod.init(cfg.device, fsdp_alone=cfg.cpu_offload)
        self._closers.append(lambda: dist_mod.teardown(dist_))
        self.dev = dev = dist_.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.on_gpu = on_gpu = dev.type == "cuda"
        self.cfg = cfg = resolve_config(cfg, on_gpu, dist_.world_size)

        run_dir = find_run_dir(resume) if resume else None
        if run_dir is None:
            if dist_.is_main:
                run_dir = new_run_dir(Path(cfg.out)) if not dry_run else Path(cfg.out) / ".dry-run"
                run_dir.mkdir(parents=True, exist_ok=True)
            if dist_.enabled:  # every rank uses rank 0's directory
                names = [str(run_dir) if run_dir else None]
                torch.distributed.broadcast_object_list(names, src=0)
                run_dir = Path(names[0])
        self.run_dir = run_dir
        self.prep = prep = prepare_data(cfg, run_dir, dist_, log=self.say)
        self.tok = prep.tokenizer

        # Model shape first (known before any weight exists, so --dry-run never allocates a 7B model).
        finetune = is_model_path(cfg.model)
        if finetune:
            args = read_model_args(cfg.model)
            self.tok.check_model_vocab(args.vocab_size)
        else:
            args = get_preset(cfg.model)
            if cfg.model in TOKENIZER_VOCAB_PRESETS:  # tiny / test: sized by the tokenizer trained for them
                args = args.replace(vocab_size=self.tok.vocab_size, max_seq_len=max(cfg.max_len, 512))
            else:  # published dimensions (what --dry-run sizes): the tokenizer must fit their vocabulary
                self.tok.check_model_vocab(args.vocab_size, f"preset {cfg.model}")
        self.args = args
        micro = cfg.micro_batch_tokens
        self.accum = accum = max(1, round(cfg.batch_tokens / (micro * dist_.world_size)))
        self.stream = stream = D.PackedStream(prep.train, micro, accum, dist_.world_size, seed=cfg.seed)
        self.total_steps = total_steps = cfg.max_steps or stream.steps_for_epochs(cfg.epochs)
        mem = estimate_memory(args, cfg, dist_.world_size)
        self.say(f"model {cfg.model}: {args.num_params() / 1e6:.2f}M parameters ({args.n_layers} layers, dim "
                 f"{args.dim}, vocab {args.vocab_size}); {prep.counts['train_docs']} training documents, "
                 f"{prep.counts['train_tokens']} tokens; packing efficiency {stream.efficiency():.1%} "
                 f"({micro} tokens per micro-batch, {accum} per rank per step, {dist_.world_size} rank(s)); "
                 f"{total_steps} steps; lr {cfg.lr:g}")
        if prep.counts.get("train_over_length"):
            self.say(f"{prep.counts['train_over_length']} documents longer than {cfg.max_len} tokens: "
                     f"{prep.counts['train_dropped']} dropped, {prep.counts['train_truncated']} truncated")
        if dry_run:
            lora_note = (f"; LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {mem['lora_params'] / 1e6:.2f}M "
                         f"trainable parameters, bf16 frozen base" if cfg.lora_rank else "")
            self.say(f"estimated memory per {'GPU' if on_gpu else 'process'}: {mem['total_gb']:.2f} GiB "
                     f"(weights+grads+Adam {mem['states_gb']:.2f}, activations {mem['activations_gb']:.2f}){lora_note}")
            self.dry_run_summary = {"params": args.num_params(), "steps": total_steps, "accum": accum,
                                    "packing_efficiency": stream.efficiency(), "memory_gb": mem["total_gb"],
                                    **({"lora_params": mem["lora_params"]} if cfg.lora_rank else {}), **prep.counts}
            if dist_.is_main:
                shutil.rmtree(run_dir, ignore_errors=True)
            return False

        torch.manual_seed(cfg.seed)
        model = load_model(cfg.model, device="cpu", dtype=torch.float32) if finetune else Transformer(args)
        self.use_bf16 = on_gpu and cfg.dtype != "fp32"
        if cfg.lora_rank:
            from .lora import apply_lora

            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
            if self.use_bf16:  # the frozen base in bf16 (half the memory); adapters stay fp32 for Adam
                for n, p in model.named_parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
        model.gradient_checkpointing = cfg.activation_checkpointing
        if not cfg.cpu_offload:
            model.to(dev)
        if cfg.compile:
            for block in model.layers:
                block.compile(dynamic=True)
        if dist_.fsdp:
            dist_mod.shard_model(model, torch.bfloat16 if self.use_bf16 else None, cfg.cpu_offload)
        self.model = model
        opt_kw = {"fused": True} if on_gpu and not cfg.cpu_offload else {}
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, cfg.beta2),
                                           weight_decay=cfg.weight_decay, **opt_kw)

        # Resumable state and the checkpointer.
        self.state = {"tokens_seen": 0, "elapsed": 0.0, "untrained_acc": None, "last_good": None}
        self.ckpt = Checkpointer(run_dir, model, self.optimizer, dist_, prep.tokenizer_path, cfg.keep, self.state,
                                 lora_base=str(Path(cfg.model).resolve()) if cfg.lora_rank else None,
                                 eos_ids=sorted(self.tok.eos_ids) if cfg.template == D.CHAT else None)
        self.start_step = self.ckpt.resume() if resume else 0
        if resume:
            self.say(f"resuming {run_dir} from step {self.start_step}" if self.start_step
                     else f"{run_dir}: no checkpoint yet; starting it from step 0")
        self.metrics_path = run_dir / "metrics.jsonl"
        if dist_.is_main:
            self._prepare_run_dir(resume)
        self.loggers = Loggers(run_dir, cfg.report_to, dataclasses.asdict(cfg), dist_.is_main)
        self._closers.append(self.loggers.close)
        return True

    def _prepare_run_dir(self, resume) -> None:
        """config.json, metrics.jsonl trimmed to the resumed step, stale temporaries removed, `latest`."""
        cfg, run_dir = self.cfg, self.run_dir
        need = 4 * sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        free = fsio.free_bytes(run_dir)  # a checkpoint holds the weights twice and Adam's two moments
        if need > free:
            self.say(f"warning: a checkpoint needs about {fsio.human_bytes(need)} but only {fsio.human_bytes(free)} "
                     f"is free on the file system of {run_dir}; the run will stop at its first checkpoint unless "
                     "space is freed")
        if not resume:
            write_json_atomic(run_dir / "config.json", {
                "config": dataclasses.asdict(cfg), "versions": versions(), "model_args": dataclasses.asdict(self.args),
                "steps": self.total_steps, "accum": self.accum, "world_size": self.dist.world_size,
                "data": self.prep.counts})
        # Keep only metrics up to the resumed step, so the file reads like one uninterrupted run (a line cut
        # short by a full disk or a crash is dropped).
        path = self.metrics_path
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if (rec := _json_or_none(ln)) is not None and rec.get("step", 0) <= self.start_step]
        fsio.atomic_write(path, "".join(ln + "\n" for ln in kept))
        # Temporary directories of a save that was cut short are never read; they only hold disk space.
        for stale in [*(run_dir / "checkpoints").glob(".tmp_step_*"), *run_dir.glob(".tmp_*")]:
            shutil.rmtree(stale, ignore_errors=True)
        point_latest(run_dir)

    def record(self, rec: dict) -> None:
        try:
            self.loggers.log(rec)
        except fsio.StorageError as e:
            raise fsio.StorageError(f"{e} at step {rec.get('step')}; {self.ckpt.last_good_sentence()}") from None

    def evaluate(self, accuracy: bool = True) -> tuple[dict, list]:
        """Validation loss and held-out greedy accuracy (collective)."""
        ev, rows = {}, []
        if self.val_stream:
            ev["val_loss"] = validation_loss(self.model, self.val_stream, self.dist, self.dev)
        if accuracy and self.prep.eval_problems and self.cfg.eval_problems:
            ev["greedy_acc"], rows = greedy_accuracy(self.model, self.tok, self.prep.eval_problems, self.cfg.template,
                                                     self.cfg.eval_max_new_tokens, self.dist)
        return ev, rows

    # ------------------------------------------------------------------------------------------------------
    # The training loop

    def fit(self) -> dict:
        import torch

        from .. import distributed as dist_mod

        cfg, model, optimizer, dist_, stream, state = (self.cfg, self.model, self.optimizer, self.dist, self.stream,
                                                       self.state)
        prep, run_dir, total_steps = self.prep, self.run_dir, self.total_steps
        if not cfg.eval_max_new_tokens:
            longest = int((prep.val.lengths - prep.val.n_prompt).max()) if len(prep.val) else 256
            self.cfg = cfg = cfg.replace(eval_max_new_tokens=min(1024, int(1.25 * longest) + 8))
        self.val_stream = (D.PackedStream(prep.val, max(cfg.micro_batch_tokens, int(prep.val.lengths.max())))
                           if len(prep.val) else None)
        if prep.eval_problems and state["untrained_acc"] is None and self.start_step == 0 and cfg.eval_problems:
            acc, _ = greedy_accuracy(model, self.tok, prep.eval_problems, cfg.template, cfg.eval_max_new_tokens, dist_)
            state["untrained_acc"] = acc
            self.say(f"greedy accuracy before training: {acc:.1%} on {len(prep.eval_problems)} held-out problems")
            self.record({"step": 0, "greedy_acc": acc})

        peak = peak_flops(self.dev)
        bar = None
        if dist_.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)
            self._closers.append(bar.close)
        model.train()
        t_last_save = time.time()
        flag = torch.zeros(2)  # [stop requested, time-based save due], agreed over ranks
        losses = []
        with _Signals() as sig:
            for step in range(self.start_step, total_steps):
                # 1. learning rate, this rank's micro-batches, forward + backward
                t0 = time.time()
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step, total_steps, cfg)
                batches, n_total = stream.step(step, dist_.rank)
                loss_local = accumulate_gradients(model, batches, n_total, dist_, self.dev, self.use_bf16)
                # 2. the global loss (and token counts for throughput / MFU), agreed over ranks
                n_tokens = sum(len(b.tokens) for b in batches)
                sq = sum(int((np.diff(b.cu_seqlens).astype(np.int64) ** 2).sum()) for b in batches)
                stats = torch.tensor([loss_local, n_tokens, sq], dtype=torch.float64)
                dist_mod.all_reduce(stats, dist_)
                loss = float(stats[0]) / max(1, n_total)
                if not math.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    where = (f"the last good checkpoint is {run_dir / 'checkpoints' / ('step_%d' % state['last_good'])}"
                             if state["last_good"] is not None else "no checkpoint was written before it")
                    self.record({"step": step + 1, "loss": loss, "error": "non-finite loss"})
                    raise TrainingDiverged(f"loss became {loss} at step {step + 1}; stopping ({where}). "
                                           "Lower --lr or check the data.")
                # 3. clip, update
                gnorm = None
                if cfg.grad_clip > 0:
                    # the parameters as FSDP holds them now (its lazy init may swap the objects)
                    gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                           cfg.grad_clip)
                    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if self.on_gpu:
                    torch.cuda.synchronize()
                # 4. metrics
                dt = time.time() - t0
                tokens = int(stats[1])
                state["tokens_seen"] += tokens
                state["elapsed"] += dt
                losses.append(loss)
                tok_s = tokens / dt
                rec = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": gnorm,
                       "tokens": tokens, "targets": n_total, "tokens_per_s": tok_s,
                       "epoch": stream.epoch_of_step(step + 1)}
                if peak:
                    rec["mfu"] = flops_per_token(self.args, float(stats[2]) / tokens) * tok_s / (peak * dist_.world_size)
                if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                    self.record(rec)
                if bar:
                    post = {"loss": f"{loss:.4f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{tok_s:,.0f}"}
                    if "mfu" in rec:
                        post["mfu"] = f"{rec['mfu']:.1%}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                done = step + 1
                # 5. periodic evaluation
                if cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                    ev, _ = self.evaluate()
                    self.record({"step": done, **ev})
                # 6. checkpoint on schedule, time or signal (agreed over ranks); stop on a signal
                flag.zero_()
                flag[0] = 1.0 if sig.caught is not None else 0.0
                flag[1] = 1.0 if cfg.save_minutes and (time.time() - t_last_save) > 60 * cfg.save_minutes else 0.0
                dist_mod.all_reduce(flag, dist_, op=torch.distributed.ReduceOp.MAX if dist_.enabled else None)
                if done < total_steps and (flag[0] or flag[1] or (cfg.save_every and done % cfg.save_every == 0)):
                    self.ckpt.save(done, "signal" if flag[0] else "periodic", stream.epoch_of_step(done), cfg.seed)
                    t_last_save = time.time()
                if flag[0]:
                    if bar:
                        bar.close()
                    self.say(f"stopped by signal after step {done}; checkpoint saved. Resume with: "
                             f"fastmath train --resume {run_dir}")
                    return {"run_dir": str(run_dir), "stopped_at": done, "interrupted": True}
        if bar:
            bar.close()
        return self.finish(losses)

    # ------------------------------------------------------------------------------------------------------
    # End of training: checkpoint, export, held-out evaluation, plot, summary

    def finish(self, losses: list[float]) -> dict:
        import torch

        cfg, state, run_dir, stream, total_steps = self.cfg, self.state, self.run_dir, self.stream, self.total_steps
        self.ckpt.save(total_steps, "end", stream.epoch_of_step(total_steps), cfg.seed)
        final_dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        self.ckpt.export("final", final_dtype)
        if cfg.lora_rank and cfg.merge:
            self.ckpt.export("merged", final_dtype, merge=True)
        summary = {"run_dir": str(run_dir), "steps": total_steps, "epochs": stream.epoch_of_step(total_steps),
                   "tokens_seen": state["tokens_seen"], "train_seconds": state["elapsed"],
                   "tokens_per_s": state["tokens_seen"] / max(1e-9, state["elapsed"]),
                   "final_loss": losses[-1] if losses else None,
                   # one step's loss is noisy: the mean of the last (up to) 10 steps of this process
                   "final_loss_mean": float(np.mean(losses[-10:])) if losses else None,
                   "final_loss_mean_steps": len(losses[-10:]), "packing_efficiency": stream.efficiency(),
                   "lr": cfg.lr, "untrained_greedy_acc": state["untrained_acc"]}
        if cfg.lora_rank:
            summary["lora_rank"] = cfg.lora_rank
        ev, rows = self.evaluate()
        summary.update(ev)
        hint = f"training finished and {self.ckpt.last_good_sentence()}"
        if "greedy_acc" in ev:
            summary["eval_problems"] = len(self.prep.eval_problems)
            if self.dist.is_main:
                fsio.atomic_write(run_dir / "greedy_eval.jsonl", "".join(json.dumps(r) + "\n" for r in rows), hint=hint)
        self.record({"step": total_steps, **ev})
        self.loggers.close()
        if self.dist.is_main:
            from ..plotting import plot_loss_curve

            fsio.atomic_write_json(run_dir / "summary.json", summary, hint=hint)
            try:
                plot_loss_curve(self.metrics_path, run_dir / "loss.png",
                                title=f"fastmath train: {cfg.model} ({run_dir.name})")
            except ImportError as e:  # matplotlib is a declared dependency, but a --no-deps install may lack it
                self.say(f"loss.png skipped: {e}")
            except fsio.StorageError as e:
                raise fsio.StorageError(f"{e}; {hint}") from None
            self.say(format_summary(summary))
        return summary


def format_summary(s: dict) -> str:
    """The final table printed by `fastmath train`."""
    rows = [("run", s["run_dir"]), ("steps", s["steps"]), ("epochs", f"{s['epochs']:.2f}"),
            ("tokens seen", f"{s['tokens_seen']:,}"), ("train time", f"{s['train_seconds']:.0f} s"),
            ("tokens/s", f"{s['tokens_per_s']:,.0f}"), ("packing efficiency", f"{s['packing_efficiency']:.1%}"),
            ("peak lr", f"{s['lr']:g}"),
            (f"train loss (mean of last {s.get('final_loss_mean_steps', 1)} steps)",
             f"{s['final_loss_mean']:.4f}" if s.get("final_loss_mean") is not None else "-")]
    if "val_loss" in s:
        rows.append(("validation loss", f"{s['val_loss']:.4f}"))
    if "greedy_acc" in s:
        before = s.get("untrained_greedy_acc")
        rows.append((f"greedy accuracy ({s['eval_problems']} held-out)",
                     f"{s['greedy_acc']:.1%} trained vs {before:.1%} untrained" if before is not None
                     else f"{s['greedy_acc']:.1%}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
