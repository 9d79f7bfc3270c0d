"""Composable attention masks.

Every factory returns a :class:`Mask`: a named predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool`` that
says which keys a query may see (True = attend). Masks compose with ``&``, ``|`` and ``~``, render to a
dense boolean tensor with :meth:`Mask.to_dense`, and draw themselves with :meth:`Mask.draw`.

Positional masks are bottom-right aligned like ``attention(causal=True)``: with Sq queries and Sk keys,
query row ``i`` stands at key position ``i + (Sk - Sq)``. Calling ``mask.mask_mod`` directly assumes
Sq == Sk; ``attention`` binds the real lengths (per sequence for packed ``thd`` batches).
"""

from attnkit.masks._data import flashmask, shared_prefix
from attnkit.masks._mask import (
    Mask,
    causal,
    chunked,
    dilated_sliding_window,
    document,
    from_mask_mod,
    full,
    global_sliding,
    neighborhood_2d,
    prefix_lm,
    sliding_window,
)

__all__ = [
    "Mask",
    "causal",
    "chunked",
    "dilated_sliding_window",
    "document",
    "flashmask",
    "from_mask_mod",
    "full",
    "global_sliding",
    "neighborhood_2d",
    "prefix_lm",
    "shared_prefix",
    "sliding_window",
]
