"""The ``triton`` backend: attnkit's own FlashAttention-style kernels.

Layout (a kernel, its launcher, its capability check and its test are found by folder):

- ``backend.py``: can this backend serve a call, and at what cost (``supported()`` / ``cost()``).
- ``decode.py``: the ``triton_decode`` backend (short queries on the split-KV decode kernel).
- ``kernels/``: device code only (``@triton.jit`` and Gluon); ``kernels/hopper/`` holds the Hopper variants.
- ``ops/``: host launchers and the ``torch.library`` custom ops (fake implementation and autograd).
- ``runtime/``: the launch cache, tile tuning and device facts.
"""

from attnkit.backends.triton.backend import BACKEND, TritonBackend
from attnkit.backends.triton.decode import DECODE_BACKEND, TritonDecodeBackend

BACKENDS = [BACKEND, DECODE_BACKEND]

__all__ = ["BACKEND", "BACKENDS", "DECODE_BACKEND", "TritonBackend", "TritonDecodeBackend"]
