"""Process groups, FSDP2 wrapping and distributed checkpoint I/O for the trainer.

Started by `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set), the trainer shards the model with FSDP2
(`fully_shard` on each block, then on the root); a plain `python`/`fastmath train` run is one process and
touches none of torch.distributed except for the (process-local) checkpoint writer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False  # the model is sharded with FSDP2 (several ranks, or one rank with CPU offload)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto", fsdp_alone: bool = False) -> Dist:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU) and pick the device.

    fsdp_alone: start a one-process group even without torchrun, so FSDP2 (CPU offload) can run on one GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if (world > 1 or fsdp_alone) and not dist.is_initialized():
        if world == 1:
            import socket

            with socket.socket() as s:  # a free port for the one-process rendezvous
                s.bind(("127.0.0.1", 0))
                os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return Dist(rank, world, local, dev, fsdp=world > 1 or fsdp_alone)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce(t: torch.Tensor, d: Dist, op=None) -> torch.Tensor:
    """In-place sum (or `op`) over ranks; a no-op in one process. CPU tensors travel through the GPU
    under NCCL (which only reduces CUDA tensors)."""
    if d.enabled:
        if d.device.type == "cuda" and not t.is_cuda:
            on_dev = t.to(d.device)
            dist.all_reduce(on_dev, op=op or dist.ReduceOp.SUM)
            t.copy_(on_dev.cpu())
        else:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def teardown(d: Dist) -> None:
    if d.fsdp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_model(model, param_dtype: torch.dtype | None, cpu_offload: bool = False):
    """FSDP2: `fully_shard` each block, then the root (embeddings, final norm, head).

    A tied head (args.tie_embeddings) is the embedding's one parameter: it must stay in one FSDP unit with
    both its users (torchtitan groups [tok_embeddings, norm, output] for the same reason), here the root,
    which gathers it once for the embedding and the head and reduces its two gradients as one.

    param_dtype: dtype of the gathered parameters for compute (bf16 on GPU); gradients are reduced in fp32
    and the sharded master weights stay fp32. cpu_offload keeps shards, gradients and optimizer state in
    host memory (for models that do not fit otherwise).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    if getattr(model.args, "tie_embeddings", False) and model.lm_head.weight is not model.embed_tokens.weight:
        raise RuntimeError("FSDP sharding untied lm_head from embed_tokens (tie_embeddings); they must stay one parameter")
    return model


def full_state_dict(model, d: Dist) -> dict:
    """The whole model's state dict on CPU, on rank 0 (empty elsewhere); collective when sharded."""
    if not d.fsdp:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _trainable(model, model_sd: dict) -> dict:
    """Only the entries of trainable parameters (LoRA: the adapters; the frozen base is the --model dir)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in keep}


def save_sharded(model, optimizer, path: str, trainable_only: bool = False) -> None:
    """Model and optimizer state with torch.distributed.checkpoint (each rank writes its shards; works in
    one process too). Exact: fp32 master weights and Adam moments as they are. `trainable_only`: leave the
    frozen parameters out (a LoRA run's base weights)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import warnings

    model_sd, optim_sd = get_state_dict(model, optimizer)
    if trainable_only:
        model_sd = _trainable(model, model_sd)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_sharded(model, optimizer, path: str, trainable_only: bool = False) -> None:
    """Inverse of `save_sharded`, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    if trainable_only:
        model_sd = _trainable(model, model_sd)
    state = {"model": model_sd, "optim": optim_sd}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not trainable_only))
