"""Fused Triton kernels (RMSNorm, RoPE, gated MLP activations, ...) for Hugging Face models."""
