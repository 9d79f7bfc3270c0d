"""Gluon (warp-specialized, TMA) kernels for Hopper GPUs."""
