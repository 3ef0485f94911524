"""The LLaMA block: RMSNorm, rotary, grouped-query attention, SwiGLU, output head.

LLaMA-2 is the default; LLaMA-3.x, Mistral and Qwen2 are the same block with the switches of ModelArgs
(q/k/v biases, tied embeddings, llama3 rope scaling, an explicit head_dim, a sliding window that no sequence
may exceed).

Parameter names follow Hugging Face's LlamaForCausalLM (without its `model.` prefix), so checkpoints
map one to one. Sequences are handled packed: a (T,) stream of tokens with per-document positions and
`cu_seqlens` boundaries; a (B, T) batch is the special case of B documents of length T.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import kernels as K
from .attention import varlen_attention
from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return K.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_theta, self.rope_scaling = args.rope_theta, args.rope_scaling
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, positions, cu_seqlens, max_seqlen: int, cache=None, rope=None):
        """rope: (inv_freq (D/2,), cos_sin or None) shared by all layers; None computes it here."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)  # (T, n_heads, D)
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)  # (T, n_kv_heads, D)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        if rope is None:
            rope = (K.rotary_inv_freq(self.head_dim, self.rope_theta, x.device, self.rope_scaling), None)
        inv_freq, cos_sin = rope
        q, k = K.apply_rotary(q, k, positions, self.rope_theta, cos_sin=cos_sin, inv_freq=inv_freq)
        if cache is not None:  # the cache stores k, v and attends (prefill or decode)
            out = cache.attend(self.layer_id, q, k, v)
        else:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(K.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, positions, cu_seqlens, max_seqlen: int, cache=None, rope=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, cu_seqlens, max_seqlen, cache, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self):
        """With args.tie_embeddings, make lm_head's weight the embedding's (one parameter; call again after
        replacing either, as loading does)."""
        if self.args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, std: float = 0.02):
        """Normal(0, std) for every matrix, zeros for biases, ones for the norms (as Hugging Face initialises LLaMA)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, tokens, positions=None, cu_seqlens=None, max_seqlen: int | None = None, labels=None,
                cache=None, logits_index=None):
        """Run the model.

        Args:
            tokens: (B, T) equal-length sequences, or (T,) packed documents.
            positions: (T,) int64 position of each packed token within its document (restarting at 0).
            cu_seqlens: (n_docs + 1,) int32 document boundaries of a packed call; max_seqlen: a Python int.
            labels: same shape as tokens, aligned with the logits (the token to predict at t; -100 for none).
            cache: a KV cache (see attention.KVCache) that stores keys/values and attends; packed calls only.
            logits_index: (N,) rows of the packed stream to compute logits for (e.g. each sequence's last).
        Returns:
            logits (B, T, V) or (T, V) (or (N, V) with logits_index), in the activations' dtype; with
            `labels`, `(loss_sum, n_targets)`: the fp32 summed cross-entropy and the number of targets.
        """
        batched = tokens.dim() == 2
        if batched:
            B, L = tokens.shape
            if positions is None:
                positions = torch.arange(L, device=tokens.device).repeat(B)
            if cu_seqlens is None:
                cu_seqlens = torch.arange(0, B * L + 1, L, device=tokens.device, dtype=torch.int32)
                max_seqlen = L
            tokens = tokens.reshape(-1)
            labels = labels.reshape(-1) if labels is not None else None
        elif cu_seqlens is None and cache is None:
            raise ValueError("a packed (1-D) call needs positions, cu_seqlens and max_seqlen")
        if positions is None:
            raise ValueError("a packed (1-D) call needs positions")
        if self.args.sliding_window is not None:
            self._check_window(positions, max_seqlen)

        x = self.embed_tokens(tokens)  # (T, dim)
        # One inv_freq (llama3-scaled when configured) for all layers; the reference rotary path also shares
        # one cos/sin table across layers, the Triton kernel computes its angles on the fly.
        a = self.args
        inv_freq = K.rotary_inv_freq(a.head_dim, a.rope_theta, x.device, a.rope_scaling)
        rope = (inv_freq, None if K.use_triton(x) else K.rotary_cos_sin(positions, a.head_dim, inv_freq=inv_freq))
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, positions, cu_seqlens, max_seqlen, cache, rope, use_reentrant=False)
            else:
                x = layer(x, positions, cu_seqlens, max_seqlen, cache, rope)
        x = self.norm(x)

        if labels is not None:  # the output head and the loss fused: full logits are never materialised
            loss_sum = K.fused_linear_cross_entropy(x, self.lm_head.weight, labels, reduction="sum")
            return loss_sum, (labels != -100).sum()
        if logits_index is not None:
            x = x[logits_index]
        logits = self.lm_head(x)
        return logits.view(B, L, -1) if batched and logits_index is None else logits

    def _check_window(self, positions, max_seqlen):
        """Attention here is full causal: exact for a sliding-window model only while no sequence is longer than
        the window (Mistral v0.1's 4096), so a longer one is an error rather than silently different logits."""
        # positions.max() syncs with the device: skipped while torch.compile traces or a CUDA graph is captured
        # (the engine then bounds sequences by its max_model_len)
        tracing = torch.compiler.is_compiling() or (positions.is_cuda and torch.cuda.is_current_stream_capturing())
        last = int(positions.max()) + 1 if positions.numel() and not tracing else 0
        longest = max(int(max_seqlen or 0), last)
        if longest > self.args.sliding_window:
            raise ValueError(f"a sequence of {longest} tokens exceeds the model's sliding_window of "
                             f"{self.args.sliding_window}; fastmath runs sliding-window models only up to the window")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
