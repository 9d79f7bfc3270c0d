"""The ``triton`` backend: attnkit's own FlashAttention-style kernels.

Layout (a kernel, its launcher, its capability check and its test are found by folder):

- ``backend.py``: can this backend serve a call, and at what cost (``why_not()`` / ``cost()``).
- ``params.py``: one parameter object per op (``FwdParams``, ``BwdParams``); the ops' schemas, fakes, what
  autograd saves, the replay and tuning keys all derive from it.
- ``kernels/``: device code only (``@triton.jit`` and Gluon); ``kernels/hopper/`` holds the Hopper variants.
- ``ops/``: host code: the launchers (``fwd.py``, ``bwd.py``, ``gluon_fwd.py``, ``gluon_bwd.py``) and the
  ``torch.library`` custom ops with their autograd and replays (``attention.py``).
- ``runtime/``: what the kernels can do (``capability.py``: the table ``backend.py`` and the launchers
  read), the launch cache (``launch.py``) and tile tuning (``tuning.py``).
"""

from attnkit.backends.triton.backend import BACKEND, TritonBackend

__all__ = ["BACKEND", "TritonBackend"]
