"""attnkit: fast and flexible attention for PyTorch.

One call, :func:`attention`, covers every layout, GQA/MQA, causal and windowed masks, softcap, ALiBi,
biases, dropout and programmable ``score_mod``/``mask``, and runs on the fastest backend that supports
the call exactly. :func:`explain` says which backend runs and why the others do not.
"""

from attnkit import masks, mods
from attnkit._compile import compile_count
from attnkit.api import attention, explain
from attnkit.dispatch import backends, register
from attnkit.errors import AttentionInputError, UnsupportedError
from attnkit.merge import merge_attention

__version__ = "0.1.0"

# Register the built-in backends at import, so that calls traced by torch.compile find them ready.
from attnkit.dispatch import _load  # noqa: E402

_load()

__all__ = [
    "AttentionInputError",
    "UnsupportedError",
    "attention",
    "backends",
    "compile_count",
    "explain",
    "masks",
    "merge_attention",
    "mods",
    "register",
    "__version__",
]
