"""The ``triton`` backend: attnkit's own FlashAttention-style kernels.

Layout (a kernel, its launcher, its capability check and its test are found by folder):

- ``backend.py``: can this backend serve a call, and at what cost (``supported()`` / ``cost()``).
- ``kernels/``: device code only (``@triton.jit`` and Gluon); ``kernels/hopper/`` holds the Hopper variants.
- ``ops/``: host launchers and the ``torch.library`` custom ops (fake implementation and autograd).
- ``runtime/``: the launch cache, tile tuning and device facts.
"""

from attnkit.backends.triton.backend import BACKEND, TritonBackend

__all__ = ["BACKEND", "TritonBackend"]
