"""LoRA (Hu et al., 2021): frozen base weights, trainable low-rank adapters, PEFT-compatible files.

`apply_lora(model, rank, alpha, dropout, targets)` swaps the chosen `nn.Linear` projections of a
`fastmath.model.Transformer` for `LoRALinear` from the outside (model.py is untouched). A LoRALinear keeps
the base `weight` under its old name and adds `lora_A.weight` (rank, in) and `lora_B.weight` (out, rank):

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T

B starts at zero (the adapted model starts as the base), A as PEFT's default (Kaiming-uniform), so the
parameter names, the initialisation and the files match Hugging Face PEFT's LoRA for LlamaForCausalLM (and
Mistral's and Qwen2's CausalLM classes, which have the same module names):

    adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "base_model_name_or_path", ...}
    adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...

`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)` loads what
`save_adapter` writes; `load_adapter` reads it back (fastmath sample / serve), merged into the base weights.

Family switches: a base q/k/v bias (Qwen2) stays in the LoRALinear, frozen, and is never saved with the
adapter ("bias": "none", as PEFT expects); a tied output head (LLaMA-3.2 1B/3B, Qwen2.5 <= 3B) is never a
target, so it stays the one frozen embedding parameter, and a merged export stores it once.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# --lora-targets short names -> the projection attribute names (Hugging Face's, which PEFT's config uses).
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}
PEFT_PREFIX = "base_model.model.model."  # PeftModel -> LlamaForCausalLM (Mistral.., Qwen2..) -> LlamaModel


class LoRALinear(nn.Linear):
    """nn.Linear (frozen `weight`) plus a trainable rank-r update scaled by alpha / r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter (meta, CPU or GPU), frozen by apply_lora
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):  # x: (..., in) -> (..., out)
        base = F.linear(x, self.weight, self.bias)
        # fp32 adapters meet the activations' dtype (autocast casts both products to bf16 on GPU anyway)
        h = F.linear(self.lora_dropout(x), self.lora_A.weight.to(x.dtype))  # (..., rank)
        return base + self.scaling * F.linear(h, self.lora_B.weight.to(x.dtype)).to(base.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in fp32 (what --merge exports)."""
        return self.weight.float() + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def parse_targets(targets: str | list) -> list[str]:
    """'q,k,v,o' -> ['q_proj', 'k_proj', 'v_proj', 'o_proj'] (ValueError naming an unknown one)."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    out = []
    for t in names:
        if t in TARGETS:
            out.append(TARGETS[t])
        elif t in TARGETS.values():
            out.append(t)
        else:
            raise ValueError(f"--lora-targets: unknown projection {t!r}; choose from {','.join(TARGETS)}")
    return out


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets: str | list = "q,k,v,o") -> nn.Module:
    """Freeze every parameter of `model` and add LoRA adapters to the target projections, in place.

    Returns the model; only the lora_A / lora_B weights have requires_grad afterwards."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, not {rank}")
    alpha = float(alpha) if alpha is not None else 2.0 * rank
    names = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in names:
                child = getattr(parent, name, None)
                if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                    setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": names}
    return model


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_state(state: dict) -> dict:
    """The LoRA entries of a (full) state dict, renamed to PEFT's keys."""
    return {PEFT_PREFIX + k: v for k, v in state.items() if is_lora_name(k)}


def merged_state(state: dict, lora_config: dict) -> dict:
    """A full state dict with every adapter folded into its base weight (W + alpha/r B A), LoRA keys dropped."""
    scaling = lora_config["lora_alpha"] / lora_config["r"]
    out = {k: v for k, v in state.items() if not is_lora_name(k)}
    for k in [k for k in state if k.endswith(".lora_A.weight")]:
        stem = k[: -len(".lora_A.weight")]
        w = out[stem + ".weight"]
        delta = state[stem + ".lora_B.weight"].float() @ state[k].float()
        out[stem + ".weight"] = (w.float() + scaling * delta).to(w.dtype)
    return out


def adapter_config(lora_config: dict, base: str | os.PathLike | None) -> dict:
    """PEFT's adapter_config.json for a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM base."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base) if base else None,
            "r": lora_config["r"], "lora_alpha": lora_config["lora_alpha"],
            "lora_dropout": lora_config["lora_dropout"], "target_modules": list(lora_config["target_modules"]),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_adapter(state: dict, lora_config: dict, directory: str | os.PathLike, base: str | os.PathLike | None,
                 tokenizer_path=None, eos_ids=None) -> Path:
    """Write a PEFT adapter directory from a full (unsharded) state dict (fsynced files; callers rename a
    temporary directory into place). The tokenizer files are copied in (fastmath.checkpoint.copy_tokenizer:
    tokenizer, its config and chat template, generation_config.json with `eos_ids`) so the directory samples
    and serves on its own."""
    from .. import fsio
    from ..checkpoint import copy_tokenizer, write_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state(state).items()}
    write_safetensors(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    fsio.atomic_write_json(directory / "adapter_config.json", adapter_config(lora_config, base))
    if tokenizer_path is not None:
        copy_tokenizer(tokenizer_path, directory, eos_ids=eos_ids)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the adapter config ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{path}: missing field {key!r}")
    return cfg


def base_of(directory: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base checkpoint of an adapter: `base` when given, else adapter_config.json's base_model_name_or_path."""
    cfg = read_adapter_config(directory)
    path = base or cfg.get("base_model_name_or_path")
    if not path:
        raise ValueError(f"{directory}: adapter_config.json has no base_model_name_or_path; pass --base")
    if not Path(path).is_dir():
        raise ValueError(f"{directory}: its base model {path} is not a local directory; pass --base DIR")
    return Path(path)


def load_adapter(model: nn.Module, directory: str | os.PathLike, merge: bool = True) -> nn.Module:
    """Add the adapter in `directory` to `model` (a loaded base); with `merge`, fold it into the base weights
    (plain nn.Linear again: inference runs at the base model's speed)."""
    from ..checkpoint import iter_safetensors

    cfg = read_adapter_config(directory)
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    apply_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), 0.0, targets)
    own = dict(model.named_parameters())
    path = Path(directory) / "adapter_model.safetensors"
    seen = set()
    for name, t in iter_safetensors(path):
        local = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        local = local.replace(".default.", ".")  # PEFT in-memory names carry the adapter name
        if local not in own:
            raise ValueError(f"{path}: tensor {name} does not match the base model (no {local})")
        if tuple(own[local].shape) != tuple(t.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the base model needs {tuple(own[local].shape)}")
        with torch.no_grad():
            own[local].copy_(t)
        seen.add(local)
    missing = [n for n in own if is_lora_name(n) and n not in seen]
    if missing:
        raise ValueError(f"{path}: missing adapter tensors, e.g. {missing[0]}")
    if merge:
        merge_lora(model)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + alpha/r B A (in the base weight's dtype)."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=child.weight.device, dtype=child.weight.dtype)
                    lin.weight.copy_(child.merged_weight().to(child.weight.dtype))
                    lin.weight.requires_grad_(child.weight.requires_grad)
                    if child.bias is not None:  # Qwen2's q/k/v bias: the base's, untouched by LoRA
                        lin.bias = child.bias
                    setattr(parent, name, lin)
    model.__dict__.pop("lora_config", None)
    return model


def load_model_or_adapter(path: str | os.PathLike, base: str | os.PathLike | None = None, device=None,
                          dtype=None):
    """A checkpoint directory as fastmath.checkpoint.load_model does, or an adapter directory on its base
    (found through base_model_name_or_path, or `base`), merged. Returns (model, tokenizer directory)."""
    from ..checkpoint import load_model
    from ..runs import is_adapter

    if not is_adapter(path):
        return load_model(path, device=device, dtype=dtype), Path(path)
    base_dir = base_of(path, base)
    model = load_model(base_dir, device=device, dtype=torch.float32)
    load_adapter(model, path, merge=True)
    if dtype is not None:
        model.to(dtype)
    own = any((Path(path) / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))
    tok_dir = Path(path) if own else base_dir
    return model, tok_dir


def lora_memory(args, rank: int, targets: str | list, world_size: int = 1) -> dict:
    """Bytes of a LoRA run: bf16 frozen base (fp32 on CPU is twice that), fp32 adapters with grads and
    Adam moments (16 bytes per adapter parameter)."""
    names = parse_targets(targets)
    shapes = {"q_proj": (args.dim, args.n_heads * args.head_dim), "k_proj": (args.dim, args.n_kv_heads * args.head_dim),
              "v_proj": (args.dim, args.n_kv_heads * args.head_dim), "o_proj": (args.n_heads * args.head_dim, args.dim),
              "gate_proj": (args.dim, args.intermediate_size), "up_proj": (args.dim, args.intermediate_size),
              "down_proj": (args.intermediate_size, args.dim)}
    adapter = args.n_layers * sum(rank * (shapes[n][0] + shapes[n][1]) for n in names)
    return {"adapter_params": adapter, "base_gb": 2 * args.num_params() / world_size / 2**30,
            "adapter_states_gb": 16 * adapter / world_size / 2**30}
