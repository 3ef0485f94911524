"""fastmath.kernels: fused ops with a PyTorch reference beside each (see _dispatch for the switch)."""
from ._dispatch import kernel_status, kernels_flag, kernels_mode, use_triton
from .cross_entropy import cross_entropy, cross_entropy_ref
from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rotary import apply_rotary, apply_rotary_ref, rotary_cos_sin, rotary_inv_freq
from .swiglu import swiglu, swiglu_ref

__all__ = [
    "apply_rotary", "apply_rotary_ref", "cross_entropy", "cross_entropy_ref", "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref", "kernel_status", "rms_norm", "rms_norm_ref", "rotary_cos_sin",
    "rotary_inv_freq", "swiglu", "swiglu_ref", "use_triton", "kernels_mode", "kernels_flag",
]
