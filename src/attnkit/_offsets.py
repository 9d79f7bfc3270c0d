"""Bottom-right alignment offsets shared by masks and score mods.

A query row i of a sequence with Sq queries and Sk keys sits at key position ``i + (Sk - Sq)``
(FlashAttention >= 2.1 alignment). Masks and mods that depend on positions are written in terms of
``off = Sk - Sq``; ``off`` is a Python int for dense layouts and an int tensor indexed by the batch
(sequence) index for packed ``thd`` batches, where every sequence has its own lengths.
"""

from __future__ import annotations

import torch


def offset_for(b, off):
    """Offset for batch index tensor ``b``: ``off`` itself if it is an int, else ``off[b]``."""
    if isinstance(off, torch.Tensor):
        return off[b]
    return off


def lengths_offset(q_len, kv_len):
    """``kv_len - q_len`` for ints or per-sequence tensors (``None`` means equal lengths)."""
    if q_len is None or kv_len is None:
        return 0
    return kv_len - q_len
