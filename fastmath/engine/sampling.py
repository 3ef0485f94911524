"""Sampling: counter-based noise, Gumbel-max with temperature / top-p / top-k, log-probs, and SamplingParams.

Each token's Gumbel noise is a counter-based hash of (seed, noise key, sample index, step, token id), never
of the slot or the batch, so a request's samples are the same whatever runs beside it and whatever the
slot count (up to floating-point batch effects in the logits). `fastmath sample` uses the problem index as
the noise key, the server a hash of the prompt's token ids.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# Counter-based sampling noise

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32).

    The products can exceed 2^63; int64 multiplication wraps in two's complement, so the low 32 bits
    kept by the mask are exact.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def seed_word(seed: int) -> int:
    """The 32-bit word a seed (any Python int) enters the key hash as."""
    return (seed * 0x9E3779B1 + 0x632BE5AB) & _M32


def sample_keys(seed, problems: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """(N,) int64 key per (seed, noise key, sample index); combine with the step by `step_keys`.

    Args:
        seed: a Python int for every row, or (N,) int64 `seed_word`s (one per row: requests with other seeds).
        problems: (N,) int64 noise keys in [0, 2^63) (`fastmath sample`: the problem index; the server: a
            hash of the prompt). Keys below 2^32 hash as they always did; the high half of larger keys is
            mixed in as one more round.
        samples: (N,) int64 sample index within the request.
    """
    if isinstance(seed, torch.Tensor):
        k = _mix32(seed)
    else:
        k = _mix32(torch.full_like(problems, seed_word(seed)))
    k = _mix32(k ^ (problems & _M32))
    hi = (problems >> 32) & _M32
    k = torch.where(hi != 0, _mix32(k ^ hi), k)
    return _mix32(k ^ (samples & _M32))


def prompt_noise_key(prompt_ids) -> int:
    """A stable 63-bit hash of a prompt's token ids (the server's noise key: same prompt + seed, same samples)."""
    b = np.asarray(list(prompt_ids), dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") & (2**63 - 1)


def step_keys(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    return _mix32(keys ^ _mix32((steps + 0x5BD1E995) & _M32))


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (N, V') fp32 for rows `keys` (N,) and tokens `token_ids` (V',) or (N, V').

    A pure function of (key, token id): the same for a token whatever else is in the batch.
    """
    tok = _mix32((token_ids.long() * 0x9E3779B9 + 0x7F4A7C15) & _M32)
    if tok.dim() == 1:
        tok = tok[None, :]
    h = _mix32((keys[:, None] + tok) & _M32)
    # in (0, 1): the top 24 bits + 0.5, scaled. The largest, (2^24 - 0.5) / 2^24, rounds to 1.0 in fp32 (which
    # gave +inf noise: a token drawn whatever its logit, about once per 2^24 hashes), so it is clamped to the
    # largest fp32 below 1; every other value is unchanged.
    u = (((h >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp_max_(_U_MAX)
    return -torch.log(-torch.log(u))


_U_MAX = 1.0 - 2.0 ** -24  # the largest fp32 below 1
# An upper bound on gumbel_noise (-log(-log(_U_MAX)) = 16.64), with slack for libm's last-ulp differences
GUMBEL_MAX = float(-math.log(-math.log(_U_MAX))) + 0.01


def sample_tokens(logits: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row by the Gumbel-max trick with counter-based noise.

    Args:
        logits: (N, V) fp32. keys: (N,) int64 from `step_keys`.
        temperature: <= 0 means greedy for every row. top_p: nucleus mass (1 = off). top_k: 0 = off.
        greedy: (N,) bool rows to decode greedily whatever the settings.
    Returns:
        (N,) int64 token ids.
    """
    N, V = logits.shape
    argmax = logits.argmax(-1)
    if temperature <= 0:
        return argmax
    z = logits / temperature
    if top_k and top_k < V:
        vals, ids = z.topk(top_k, dim=-1)  # (N, k): noise only for the candidates
        if top_p < 1.0:
            vals = _nucleus_mask(vals, top_p, already_sorted=True)
        pick = (vals + gumbel_noise(keys, ids)).argmax(-1)
        out = ids.gather(1, pick[:, None])[:, 0]
    else:
        if top_p < 1.0:
            z = _nucleus_mask(z, top_p)
        out = gumbel_argmax(z, keys)
    return torch.where(greedy, argmax, out) if greedy is not None else out


def gumbel_argmax(z: torch.Tensor, keys: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(z + gumbel_noise(keys, 0..V-1)) per row, drawing noise only for the tokens that can win.

    A token i can beat the row's highest-logit token t only if fl(z_i + G) >= fl(z_t + g_t), G = GUMBEL_MAX
    bounding every noise value (fp32 addition is monotonic, so fl(z_i + g_i) <= fl(z_i + G)). The noise is computed
    for the candidates alone (the C highest z of each row, C the largest candidate count over the rows), and
    ties go to the lowest token id as in argmax over the whole vocabulary: the same token, bit for bit, at a
    fraction of the hashing when the distribution is peaked (a trained model's usually is). Falls back to the
    whole vocabulary when more than a quarter of it could win.

    Args: z (N, V) fp32 scaled logits (-inf allowed where masked, not a whole row); keys (N,) from
    `step_keys`; top: (N,) argmax of z if already known.
    """
    N, V = z.shape
    ids = torch.arange(V, device=z.device)
    if N == 0 or V < 64:
        return (z + gumbel_noise(keys, ids)).argmax(-1)
    top = z.argmax(-1) if top is None else top
    g_top = gumbel_noise(keys, top[:, None])[:, 0]
    bar = z.gather(1, top[:, None])[:, 0] + g_top
    C = int(((z + GUMBEL_MAX) >= bar[:, None]).sum(-1).max())
    if C * 4 > V:
        return (z + gumbel_noise(keys, ids)).argmax(-1)
    zc, cand = z.topk(C, dim=-1)  # every possible winner (plus ties at the threshold, scored exactly)
    vals = zc + gumbel_noise(keys, cand)
    best = vals.max(-1, keepdim=True).values
    return torch.where(vals == best, cand, V).min(-1).values


def _nucleus_mask(z: torch.Tensor, top_p: float, already_sorted: bool = False) -> torch.Tensor:
    """-inf outside the smallest set of highest-probability tokens whose mass reaches top_p."""
    if already_sorted:
        sz, order = z, None
    else:
        sz, order = z.sort(dim=-1, descending=True)
    probs = torch.softmax(sz, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
    drop = before >= top_p
    drop[:, 0] = False
    if order is None:
        return sz.masked_fill(drop, float("-inf"))
    return z.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))




def sample_tokens_rows(logits: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                       top_k: torch.Tensor, greedy: torch.Tensor, filtered: bool) -> torch.Tensor:
    """`sample_tokens` with per-row settings as tensors (the compilable decode step: no host reads).

    Args:
        logits: (N, V) fp32. keys: (N,) from `step_keys`. temperature, top_p: (N,) fp32 (temperature 0 =
        greedy). top_k: (N,) int64 (0 = off). greedy: (N,) bool. filtered: whether any row uses top-p or
        top-k (a Python bool: without filters no sort is needed).
    Returns:
        (N,) int64 token ids; the same draws as `sample_tokens` for the same settings (up to ties at
        the top-p boundary, decided here over the whole sorted vocabulary).
    """
    N, V = logits.shape
    argmax = logits.argmax(-1)
    z = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if filtered:
        sz, order = z.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=z.device)[None, :]
        drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        probs = torch.softmax(sz.masked_fill(drop, float("-inf")), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        drop = drop | ((before >= top_p[:, None]) & (rank > 0))
        z = z.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    out = (z + gumbel_noise(keys, torch.arange(V, device=logits.device))).argmax(-1)
    return torch.where(greedy | (temperature <= 0), argmax, out)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int):
    """Log-probs of the raw model distribution (before temperature and filters).

    Args: logits (N, V) fp32; chosen (N,) int64; k: top entries wanted (0: none).
    Returns: (chosen_lp (N,), top_lp (N, k), top_ids (N, k)) on the logits' device.
    """
    lsm = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = lsm.gather(1, chosen[:, None])[:, 0]
    top_lp, top_ids = lsm.topk(k, dim=-1) if k > 0 else (lsm[:, :0], chosen[:, None][:, :0])
    return chosen_lp, top_lp, top_ids


def logprob_dicts(chosen: list[int], chosen_lp: list[float], top_lp, top_ids, ks: list[int]) -> list[dict[int, float]]:
    """One {token id: logprob} per row: the chosen token first, then its request's top-k (host lists)."""
    out = []
    for i, (c, lp, k) in enumerate(zip(chosen, chosen_lp, ks)):
        d = {int(c): float(lp)}
        for t, v in zip(top_ids[i][:k], top_lp[i][:k]):
            d.setdefault(int(t), float(v))
        out.append(d)
    return out


# ----------------------------------------------------------------------------------------------------------
# Per-request settings


@dataclass
class SamplingParams:
    """What to sample for one request.

    n: samples. temperature: 0 = greedy. top_p: nucleus mass (1 = off). top_k: 0 = off.
    max_new_tokens: most tokens per sample. seed: noise seed (None: the engine draws one at add_request).
    greedy: also decode one greedy completion (sample index n; first-answer accuracy), sharing the prefill.
    stop_at_answer: stop after a completed "The answer is: ..." line. stop_strings: extra stop strings (the
    text is cut before them). stop_token_ids: tokens that end a sample, besides EOS. ignore_eos: EOS does
    not end a sample. logprobs: None, or k >= 0: each generated token's log-prob plus the top k.
    prompt_logprobs: None, or k >= 0: the same for each prompt token (the first has none).
    Log-probs are those of the raw model distribution (before temperature, top-p and top-k).
    """

    n: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    seed: int | None = 0
    greedy: bool = False
    stop_at_answer: bool = True
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        def whole(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        whole("n", 0)
        if self.n == 0 and not self.greedy:
            raise ValueError(f"n must be >= 1 (or 0 with greedy), got {self.n}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        whole("top_k", 0)
        whole("max_new_tokens", 1)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if not all(isinstance(s, str) for s in self.stop_strings):
            raise ValueError(f"stop_strings must be strings, got {self.stop_strings!r}")
        self.stop_strings = tuple(s for s in self.stop_strings if s)
        ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else tuple(self.stop_token_ids)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = tuple(int(t) for t in ids)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                whole(name, 0)

    @property
    def per_prompt(self) -> int:
        return self.n + int(self.greedy)
