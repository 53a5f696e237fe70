"""Fused linear-attention kernels (importable as `sana_jax.kernels`)."""

from sana_jax.kernels.linear_attention import linear_attention, linear_attention_xla, triton_unsupported

__all__ = ["linear_attention", "linear_attention_xla", "triton_unsupported"]
