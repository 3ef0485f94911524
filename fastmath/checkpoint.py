"""Read and write Hugging Face checkpoint directories of the LLaMA block: LlamaForCausalLM (LLaMA-2, 3.x),
MistralForCausalLM and Qwen2ForCausalLM.

A directory holds `config.json`, `generation_config.json`, `model.safetensors` (or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`), and, when known,
`tokenizer.model` or `tokenizer.json` and `tokenizer_config.json`. Hub weights open as they are, and
what fastmath writes opens in transformers' `AutoModelForCausalLM.from_pretrained` as the same architecture.

Loading builds the model on the meta device and streams tensors shard by shard with plain reads (no
mmap, so page cache is not counted as resident memory) straight into the target dtype and device:
peak memory is the model plus one tensor.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelArgs, check_rope_scaling, get_preset
from .model import Transformer

SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
SAFE_NAMES = {v: k for k, v in SAFE_DTYPES.items()}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry; recomputed here


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------
# config.json <-> ModelArgs


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def args_to_hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int | None = 1, eos_id=2) -> dict:
    """config.json for the model's family (LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM); writes both
    the old and the new spellings of rope (`rope_theta`/`rope_scaling`, `rope_parameters`) and dtype."""
    name = DTYPE_NAMES.get(dtype, "float32")
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        rope = {**args.rope_scaling, "rope_theta": args.rope_theta}
    cfg = {
        "architectures": [ARCHITECTURES[args.model_type]],
        "model_type": args.model_type,
        "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": name,
        "dtype": name,
    }
    if args.rope_scaling is not None:
        cfg["rope_scaling"] = dict(rope)  # the spelling transformers 4.x reads
    if args.model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif args.model_type == "mistral":
        cfg["sliding_window"] = args.sliding_window
    else:  # qwen2: q/k/v biases are implied by the architecture; every layer slides when a window is set
        cfg.update(use_sliding_window=args.sliding_window is not None, sliding_window=args.sliding_window,
                   max_window_layers=0 if args.sliding_window is not None else args.n_layers)
    return cfg


def _refuse(path, what: str):
    raise CheckpointError(f"{path}: {what} is not supported by fastmath (LLaMA, Mistral and Qwen2 blocks only)")


def hf_config_to_args(cfg: dict, path: Path) -> ModelArgs:
    """ModelArgs from a config.json dict of LlamaForCausalLM (LLaMA-2, 3.x), MistralForCausalLM or
    Qwen2ForCausalLM, in the older (`rope_theta`, `rope_scaling` with `type`, `torch_dtype`) or newer
    (`rope_parameters`, `dtype`) spelling. Anything that would change the math and is not implemented (another
    architecture, rope type, activation, bias or attention variant) is refused by name."""
    model_type = cfg.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        _refuse(path, f"model_type {model_type!r}")
    for arch in cfg.get("architectures") or []:
        if arch != ARCHITECTURES[model_type]:
            _refuse(path, f"architecture {arch!r} (model_type {model_type!r} is {ARCHITECTURES[model_type]})")
    if cfg.get("hidden_act", "silu") != "silu":
        _refuse(path, f"hidden_act {cfg['hidden_act']!r} (the LLaMA block uses silu)")
    for flag in ("attention_bias", "mlp_bias"):  # LLaMA's attention_bias also puts a bias on o_proj
        if cfg.get(flag):
            _refuse(path, f"{flag}: true")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
    rope = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_scaling"):  # transformers lets the old field win when both are present
        old = dict(cfg["rope_scaling"])
        old.setdefault("rope_type", old.pop("type", "default"))
        rope = {**rope, **old}
    if any(isinstance(v, dict) for v in rope.values()):
        _refuse(path, "per-layer-type rope_parameters")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        _refuse(path, f"partial_rotary_factor {partial}")
    theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    max_pos = cfg.get("max_position_embeddings", 4096)
    if (rope.get("rope_type") or rope.get("type")) == "llama3":
        rope.setdefault("original_max_position_embeddings", max_pos)  # as transformers' standardize_rope_params
    try:
        scaling = check_rope_scaling(rope) if rope else None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    layer_types = cfg.get("layer_types") or []
    odd = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if odd:
        _refuse(path, f"layer type(s) {', '.join(map(repr, odd))}")
    window = None
    if model_type == "mistral":
        window = cfg.get("sliding_window")
    elif model_type == "qwen2" and cfg.get("use_sliding_window"):
        # Some layer slides: layer_types says which when given, else layers from max_window_layers on do
        slides = "sliding_attention" in layer_types if layer_types else \
            cfg.get("max_window_layers", 28) < cfg["num_hidden_layers"]
        window = cfg.get("sliding_window", 4096) if slides else None
    n_heads = cfg["num_attention_heads"]
    try:
        return ModelArgs(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
            intermediate_size=cfg.get("intermediate_size"), norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=theta, max_seq_len=max_pos, head_dim=cfg.get("head_dim") or None,
            qkv_bias=model_type == "qwen2", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling, sliding_window=window, model_type=model_type,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _config_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return {v: k for k, v in DTYPE_NAMES.items()}.get(name, torch.float32)


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None


def read_model_args(directory: str | os.PathLike) -> ModelArgs:
    path = Path(directory) / "config.json"
    return hf_config_to_args(read_json(path), path)


# ----------------------------------------------------------------------------------------------------------
# safetensors streaming


def _read_header(f, path: Path) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path}: truncated safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 * 2**20:
        raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_safetensors(path: Path, names=None):
    """Yield (name, cpu tensor) for each tensor of a .safetensors file, read without mmap."""
    with open(path, "rb") as f:
        header, base = _read_header(f, path)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if names is not None and name not in names:
                continue
            if info["dtype"] not in SAFE_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=SAFE_DTYPES[info["dtype"]])
            buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else bytearray()
            if len(buf) != end - start:
                raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']}")
            f.seek(base + start)
            if f.readinto(buf) != end - start:
                raise CheckpointError(f"{path}: truncated at tensor {name}")
            yield name, t


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    if list(directory.glob("*.bin")):
        raise CheckpointError(f"{directory}: only PyTorch .bin weights found; fastmath reads safetensors")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def _hf_to_local(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def load_hf_directory(directory: str | os.PathLike, device=None, dtype=None) -> Transformer:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg_path = directory / "config.json"
    cfg = read_json(cfg_path)
    args = hf_config_to_args(cfg, cfg_path)
    dtype = dtype or _config_dtype(cfg)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(args)
    params = dict(model.named_parameters(remove_duplicate=False))
    for file in weight_files(directory):
        for name, tensor in iter_safetensors(file):
            local = _hf_to_local(name)
            if local.endswith(IGNORED_KEYS) or (args.tie_embeddings and local == "lm_head.weight"):
                continue  # a tied head is the embedding (transformers ignores a stored copy too)
            if local not in params:
                raise CheckpointError(f"{file}: unexpected tensor {name}")
            if tuple(tensor.shape) != tuple(params[local].shape):
                raise CheckpointError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, the config implies "
                                      f"{tuple(params[local].shape)}")
            module_name, _, attr = local.rpartition(".")
            module = model.get_submodule(module_name)
            module._parameters[attr] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=True)
            params[local] = module._parameters[attr]
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model


def load_model(path_or_preset, device=None, dtype=None) -> Transformer:
    """A model from a Hugging Face LLaMA directory, or a named preset with random weights.

    Args:
        path_or_preset: a checkpoint directory, or one of fastmath.config.PRESETS.
        device: where the weights go (default cpu). dtype: default the checkpoint's (fp32 for presets).
    """
    path = Path(path_or_preset)
    if path.is_dir():
        return load_hf_directory(path, device=device, dtype=dtype)
    from .config import PRESETS

    if str(path_or_preset) in PRESETS:
        with torch.device(device or "cpu"):
            model = Transformer(get_preset(str(path_or_preset)))
        return model.to(dtype) if dtype is not None else model
    raise CheckpointError(f"{path_or_preset}: neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


# ----------------------------------------------------------------------------------------------------------
# writing


def _shard(state: dict, max_shard_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    shards.append(current)
    return shards


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """One .safetensors file (8-byte header length, JSON header padded to 8 bytes, raw little-endian data),
    written with plain Python writes and fsynced, so a full disk surfaces as an OSError naming the file."""
    # the data in safetensors' own order (wider dtypes first, then by name): the same bytes as its save_file
    tensors = dict(sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])))
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(model: Transformer, directory: str | os.PathLike, tokenizer_path=None, dtype=None,
                    max_shard_size: int = 5 * 2**30, state_dict: dict | None = None, eos_ids=None) -> Path:
    """Write `model` as a Hugging Face LLaMA directory (every file fsynced; callers that need the directory
    to appear all at once write it under a temporary name and rename it, as the trainer does).

    Args:
        tokenizer_path: a SentencePiece model, a tokenizer.json or a checkpoint directory: copied in with the
            base's tokenizer_config.json (chat template) and generation_config.json (see `copy_tokenizer`).
        eos_ids: the ids that end a generation, written to generation_config.json and config.json (default: the
            tokenizer's EOS set; a run trained with `--template chat` adds the template's end-of-turn token).
        dtype: dtype of the stored weights (default: the model's).
        max_shard_size: bytes per safetensors shard; larger models are sharded with an index file.
        state_dict: the full (unsharded) state dict, when `model` itself is sharded (FSDP).
    Raises:
        OSError: the disk is full or failing (the directory is then incomplete).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    dtype = dtype or next(iter(state.values())).dtype
    hf_state = {}
    for name, t in state.items():
        if model.args.tie_embeddings and name == "lm_head.weight":
            continue  # one tensor, stored as embed_tokens only (as transformers saves tied weights)
        hf_name = name if name.startswith("lm_head.") else "model." + name
        hf_state[hf_name] = t.detach().to("cpu", dtype).contiguous()
    bos, eos = 1, 2
    if tokenizer_path is not None:
        bos, eos = copy_tokenizer(tokenizer_path, directory, model.args, eos_ids)
    else:
        _write_json(directory / "generation_config.json",
                    {"bos_token_id": bos, "eos_token_id": eos, "max_length": model.args.max_seq_len})
    _write_json(directory / "config.json", args_to_hf_config(model.args, dtype, bos, eos))
    shards = _shard(hf_state, max_shard_size)
    for old in list(directory.glob("model*.safetensors")) + [directory / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0], metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / fname, shard, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        _write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                                  "weight_map": weight_map})
    return directory


def copy_tokenizer(tokenizer_path, directory: str | os.PathLike, args: ModelArgs | None = None, eos_ids=None):
    """Copy a tokenizer into a checkpoint or adapter directory: tokenizer.model or tokenizer.json, with the base's
    own tokenizer_config.json (its chat template), special_tokens_map.json and chat_template.jinja when it has
    them (a LLaMA-2 tokenizer_config.json is written for a bare SentencePiece file), and generation_config.json:
    the base's, else a minimal one, with `eos_token_id` set to `eos_ids` when given (a chat-template run's
    end-of-turn token joins the EOS set, so generation stops where training ended each answer).

    The one definition of "the tokenizer files of a directory": full checkpoints (save_checkpoint) and LoRA
    adapter directories both use it. `args` checks the vocabulary and sizes the minimal generation config.
    Returns (bos id or None, eos id or the sorted list of EOS ids) for config.json.
    """
    from .fsio import copy_file
    from .tokenizer import Tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(tokenizer_path)
    if args is not None:
        tok.check_model_vocab(args.vocab_size)
    source = tok.path.parent
    same = source.resolve() == directory.resolve()
    target = directory / ("tokenizer.json" if tok.kind == "tokenizers" else "tokenizer.model")
    if tok.path.resolve() != target.resolve():
        copy_file(tok.path, target)
    if tok.kind == "sentencepiece" and (source / "tokenizer.json").is_file() and not same:
        copy_file(source / "tokenizer.json", directory / "tokenizer.json")  # Mistral v0.3: chat encoding uses it
    for name in ("special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file() and not same:
            copy_file(source / name, directory / name)
    if (source / "tokenizer_config.json").is_file():
        if not same:
            copy_file(source / "tokenizer_config.json", directory / "tokenizer_config.json")
    elif tok.kind == "sentencepiece":
        _write_json(directory / "tokenizer_config.json",
                    {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                     "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
                     "clean_up_tokenization_spaces": False, "legacy": False,
                     **({"model_max_length": args.max_seq_len} if args is not None else {})})
    ids = sorted(set(tok.eos_ids) | set(int(i) for i in (eos_ids or ())))
    eos = ids if len(ids) > 1 else tok.eos_id
    generation = read_json(source / "generation_config.json") if (source / "generation_config.json").is_file() else None
    if generation is None:
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": eos,
                      **({"max_length": args.max_seq_len} if args is not None else {})}
    elif eos_ids is not None:
        generation = {**generation, "eos_token_id": eos}
    _write_json(directory / "generation_config.json", generation)
    return tok.bos_id, eos


def checkpoint_bytes(state: dict, dtype=None) -> int:
    """Bytes of the weights of `state` stored in `dtype` (default: each tensor's own)."""
    return sum(t.numel() * (torch.empty((), dtype=dtype).element_size() if dtype else t.element_size())
               for t in state.values())
