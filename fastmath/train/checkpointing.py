"""Checkpoints of a run: atomic save, retention, exact resume (weights, optimizer, RNG, data cursor), export.

    checkpoints/step_N/            HF layout (or, under LoRA, a PEFT adapter directory) + trainer_state/:
        trainer_state/dcp/         model + optimizer with torch.distributed.checkpoint (each rank its shards;
                                   under LoRA only the trainable adapters: the frozen base is the --model dir)
        trainer_state/rng_rankR.pt torch / python / numpy / cuda RNG states of rank R
        trainer_state/state.json   step, epoch, data cursor, tokens seen, last good step, ...
    final/                         HF layout in the compute dtype; under LoRA the PEFT adapter directory,
    merged/                        with --merge: the adapters folded into a full HF checkpoint

Every directory is written under a temporary name and renamed: a crash leaves the last good checkpoint and a
temporary directory that the next run removes. Free space is checked first; a write that fails anyway
(ENOSPC, EIO) removes its partial files and raises fsio.StorageError naming the last good checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist_mod
from .. import fsio
from ..runs import list_checkpoints, write_json_atomic
from . import lora as L


class Checkpointer:
    def __init__(self, run_dir: Path, model, optimizer, dist_, tokenizer_path: Path, keep: int, state: dict,
                 lora_base: str | None = None, eos_ids=None):
        """`state` is the trainer's dict of resumable counters (tokens_seen, elapsed, last_good, ...), shared:
        the checkpointer writes it and sets state['last_good']. `lora_base`: the base checkpoint of a LoRA
        run (its adapters are saved in PEFT format, pointing at it). `eos_ids`: the EOS set the saved
        generation_config.json lists (a `--template chat` run adds the template's end of turn), else the base's."""
        self.run_dir, self.model, self.optimizer, self.dist = run_dir, model, optimizer, dist_
        self.tokenizer_path, self.keep, self.state, self.lora_base = tokenizer_path, keep, state, lora_base
        self.lora = getattr(model, "lora_config", None)
        self.eos_ids = eos_ids

    # -- messages ------------------------------------------------------------------------------------------

    def last_good_sentence(self) -> str:
        run_dir = self.run_dir
        if self.state["last_good"] is None:
            return (f"no checkpoint was written yet; free some space, then start again with "
                    f"`fastmath train --resume {run_dir}`")
        return (f"the last good checkpoint is {run_dir / 'checkpoints' / ('step_%d' % self.state['last_good'])}; "
                f"free some space, then continue with `fastmath train --resume {run_dir}`")

    def _agree(self, failure: BaseException | None, step: int, where: Path) -> None:
        """Every rank learns whether any rank failed (so none waits at a barrier for a rank that left);
        a storage failure becomes the one sentence, anything else goes up as it is."""
        flag = torch.tensor([0.0 if failure is None else 1.0])
        dist_mod.all_reduce(flag, self.dist, op=torch.distributed.ReduceOp.MAX if self.dist.enabled else None)
        if not float(flag):
            return
        if self.dist.is_main:
            shutil.rmtree(where, ignore_errors=True)
        if isinstance(failure, fsio.StorageError):  # refused before writing: already the sentence
            raise failure
        if failure is not None and fsio.storage_cause(failure) is None:
            raise failure
        why = fsio.reason(failure) if failure is not None else "another rank could not write its part"
        raise fsio.StorageError(f"could not write the checkpoint of step {step} to {where.parent} ({why}); its "
                                f"partial files were removed and {self.last_good_sentence()}")

    # -- save / resume -------------------------------------------------------------------------------------

    def _write_weights(self, directory: Path, full: dict, dtype=None) -> None:
        """HF layout, or the PEFT adapter directory of a LoRA run."""
        from ..checkpoint import save_checkpoint

        if self.lora:
            L.save_adapter(full, self.lora, directory, self.lora_base, tokenizer_path=self.tokenizer_path,
                           eos_ids=self.eos_ids)
        else:
            save_checkpoint(self.model, directory, tokenizer_path=self.tokenizer_path, state_dict=full, dtype=dtype,
                            eos_ids=self.eos_ids)

    def save(self, step: int, reason: str, epoch: float, seed: int) -> None:
        """checkpoints/step_N (collective: every rank calls it)."""
        run_dir, model, optimizer, dist_, state = self.run_dir, self.model, self.optimizer, self.dist, self.state
        final_dir = run_dir / "checkpoints" / f"step_{step}"
        tmp = run_dir / "checkpoints" / f".tmp_step_{step}"
        if state["last_good"] == step and (final_dir / "trainer_state" / "state.json").is_file():
            return  # resumed from this very checkpoint (a run that stopped after its last step): nothing new
        failure = None
        try:
            if dist_.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                weights = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                              if not self.lora or L.is_lora_name(k))
                need = (weights * 2  # HF weights + the fp32 weights in dcp (global sizes under FSDP)
                        + sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                              if torch.is_tensor(v))
                        + self.tokenizer_path.stat().st_size)
                fsio.check_free(tmp.parent, need, f"the checkpoint of step {step}", self.last_good_sentence())
                (tmp / "trainer_state").mkdir(parents=True)
        except BaseException as e:  # noqa: B036 (torch.distributed.checkpoint raises BaseException subclasses)
            failure = e
        self._agree(failure, step, tmp)
        try:
            dist_mod.save_sharded(model, optimizer, str(tmp / "trainer_state" / "dcp"), trainable_only=bool(self.lora))
            full = dist_mod.full_state_dict(model, dist_)
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                   "cuda": torch.cuda.get_rng_state() if dist_.device.type == "cuda" else None}
            with open(tmp / "trainer_state" / f"rng_rank{dist_.rank}.pt", "wb") as f:
                torch.save(rng, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # noqa: B036
            failure = e
        self._agree(failure, step, tmp)
        try:
            if dist_.is_main:
                self._write_weights(tmp, full)
                write_json_atomic(tmp / "trainer_state" / "state.json",
                                  {**state, "step": step, "epoch": epoch, "reason": reason,
                                   "data_cursor": {"step": step, "seed": seed}, "last_good": step})
                fsio.fsync_dir(tmp / "trainer_state")
                fsio.fsync_dir(tmp)
                shutil.rmtree(final_dir, ignore_errors=True)
                os.replace(tmp, final_dir)
                fsio.fsync_dir(final_dir.parent)
        except BaseException as e:  # noqa: B036
            failure = e
        self._agree(failure, step, tmp)
        state["last_good"] = step
        if dist_.is_main:  # retention: the newest `keep`
            for _, old in list_checkpoints(run_dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> int:
        """Load the newest complete checkpoint of the run in place (weights, optimizer, RNG, counters);
        returns its step (0 when there is none)."""
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return 0
        step_n, ck = ckpts[-1]
        dist_mod.load_sharded(self.model, self.optimizer, str(ck / "trainer_state" / "dcp"),
                              trainable_only=bool(self.lora))
        self.state.update(json.loads((ck / "trainer_state" / "state.json").read_text()))
        rng = torch.load(ck / "trainer_state" / f"rng_rank{self.dist.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if self.dist.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        return step_n

    # -- export --------------------------------------------------------------------------------------------

    def export(self, name: str, dtype, merge: bool = False) -> Path:
        """run_dir/<name>: the final HF checkpoint (or PEFT adapter; with `merge`, the full merged checkpoint).
        Collective (the full state dict is gathered); rank 0 writes."""
        from ..checkpoint import checkpoint_bytes, save_checkpoint

        out = self.run_dir / name
        full = dist_mod.full_state_dict(self.model, self.dist)
        if not self.dist.is_main:
            return out
        tmp = self.run_dir / f".tmp_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if merge:
                full = L.merged_state(full, self.lora)
            weights = {k: v for k, v in full.items() if not self.lora or merge or L.is_lora_name(k)}
            fsio.check_free(self.run_dir, checkpoint_bytes(weights, dtype) + self.tokenizer_path.stat().st_size,
                            f"the {name} export", self.last_good_sentence())
            if merge or not self.lora:
                save_checkpoint(self.model, tmp, tokenizer_path=self.tokenizer_path, state_dict=full, dtype=dtype,
                                eos_ids=self.eos_ids)
            else:
                self._write_weights(tmp, full)
            fsio.fsync_dir(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            fsio.fsync_dir(self.run_dir)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, fsio.StorageError) or fsio.storage_cause(e) is None:
                raise
            raise fsio.StorageError(f"could not write the final export {out} ({fsio.reason(e)}); its partial "
                                    f"files were removed and {self.last_good_sentence()}") from None
        return out
