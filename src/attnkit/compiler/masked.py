"""The two halves of a masked score mod ``where(keep(b, h, q, kv, off), score_mod(s, ...), -inf)`` (the form
the Triton backend gives a mask that has no interval lowering, ``backends/triton/backend._masked_mod``), for
block sparsity (``backends/triton/ops/tiles.py``): the kernels evaluate ``keep`` once per tile into a state
(empty / partial / full), skip empty tiles, run the unmasked inner mod on full tiles and apply ``keep`` on
partial ones.

:func:`lower_masked` emits, next to the mod's ``score_mod``, in the same module and over the same captured
tensor slots (so one ``SM`` tuple serves all three):

* ``score_mod_inner(score, b, h, q, kv, off, SM) -> (value, d value / d score)``: the ``where``'s true branch;
* ``mask_keep(score, b, h, q, kv, off, SM) -> bool``: its condition, at ``score``'s shape (``score`` is read
  for its shape only);
* ``KEEP_USES_B`` / ``KEEP_USES_H``: whether the condition depends on the batch / head index (else the tile
  states are shared across that dim).

Each function carries the whole graph's lines; Triton drops those its result does not use.
"""

from __future__ import annotations

import math

import torch

from attnkit.compiler.lower import Val, _Emitter, _literal
from attnkit.compiler.trace import Traced

aten = torch.ops.aten


def _neg_inf(node) -> bool:
    """Whether a ``where``'s false branch is the constant -inf (a literal or ``scalar_tensor(-inf)``)."""
    if isinstance(node, (int, float)):
        return math.isinf(node) and node < 0
    if isinstance(node, torch.fx.Node) and node.target in (aten.scalar_tensor.default, aten.full.default):
        fill = node.args[0] if node.target is aten.scalar_tensor.default else node.args[1]
        return isinstance(fill, (int, float)) and math.isinf(fill) and fill < 0
    return False


def _ancestors(node) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def lower_masked(traced: Traced, owner) -> str | None:
    """Source of ``score_mod_inner``, ``mask_keep`` and the ``KEEP_USES_*`` flags (module docstring) for a
    traced mod whose output is ``where(cond, x, -inf)``; None for any other graph."""
    graph = traced.gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    res = out.args[0]
    res = res[0] if isinstance(res, (tuple, list)) else res
    if not (isinstance(res, torch.fx.Node) and res.target is aten.where.self and _neg_inf(res.args[2])):
        return None
    cond_node, x_node = res.args[0], res.args[1]
    e = _Emitter(traced, owner, prefix="w")
    e.run()
    cond = e.value(res, cond_node)
    x = e.value(res, x_node)
    if not isinstance(x, Val):
        x = Val(_literal(x, torch.float32), torch.float32)
    body = "\n".join(f"    {ln}" for ln in e.lines)
    zero = "tl.zeros_like(score).to(tl.float32)"
    keep = f"({e.cast(cond, torch.bool)} != 0)" if isinstance(cond, Val) else _literal(cond, torch.bool)
    inner = (
        "@triton.jit\ndef score_mod_inner(score, b, h, q, kv, off, SM):\n" + body + "\n"
        f"    return ({e.cast(x, torch.float32)}) + {zero}, ({x.d or '0.0'}) + {zero}\n"
    )
    keep_fn = (
        "@triton.jit\ndef mask_keep(score, b, h, q, kv, off, SM):\n" + body + "\n"
        f"    return ({keep}) | (tl.zeros_like(score) != 0)\n"
    )
    places = [n for n in graph.nodes if n.op == "placeholder"]  # (score, b, h, q, kv, off)
    up = _ancestors(cond_node) | ({cond_node} if isinstance(cond_node, torch.fx.Node) else set())
    flags = f"KEEP_USES_B = {places[1] in up}\nKEEP_USES_H = {places[2] in up}\n"
    return inner + "\n\n" + keep_fn + "\n\n" + flags
