"""Triton kernels, one file per kernel family, each with its plain PyTorch reference."""
