"""attnkit inside PyTorch's context parallelism (``torch.distributed.tensor.experimental.context_parallel``).

How torch's CP reaches attention (read from torch 2.13, ``_context_parallel/_attention.py``):
``context_parallel(mesh, buffers=..., buffer_seq_dims=...)`` shards the buffers in place (head-tail order
when ``_cp_options.enable_load_balance`` and the length divides by 2W, else contiguous), patches
``F.scaled_dot_product_attention`` with a wrapper that turns every tensor argument into a DTensor
``Shard(2)`` on the mesh, and installs DTensor handlers for the fused aten SDPA ops (flash, efficient,
cuDNN and their backwards) that run torch's ring with that same op per block. The CPU op
(``_scaled_dot_product_flash_attention_for_cpu``) and the math fallback have no handler there.

What this module adds (one intercept above all of that, public torch API only, nothing of torch patched):

- :func:`use_with_torch_context_parallel`: a ``TorchFunctionMode``. While it is active, a call of
  ``scaled_dot_product_attention`` whose q/k/v are DTensors sharded on the sequence (dim 2) of a 1-D mesh
  runs :func:`attnkit.distributed.context_parallel_attention` on the local shards, with the mesh's group
  and torch's sharding order; autograd runs through attnkit's ring, so torch's aten handlers are never
  reached, forward or backward, on any device.
- :func:`attention_on_dtensors`: what ``attnkit.attention`` does when it is given DTensors.

attnkit's own blocks are never caught by torch's patched SDPA: every block asks for its lse, which no
SDPA-based backend returns, so the blocks run on backends that do not call SDPA.

Sharding order (torch's DTensor ``Shard`` alone means contiguous chunks, ``torch.chunk``): inside torch's
CP (its dispatcher enabled) the order is head-tail = attnkit's ``zigzag`` when
``_cp_options.enable_load_balance`` is set, else ``contiguous``; outside it, ``contiguous``. torch's own
SDPA ring makes the same assumption, so a custom ``_LoadBalancer`` (round-robin, per-document) cannot be
read back: pass ``sharding=`` explicitly.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch
from torch.overrides import TorchFunctionMode

from attnkit.errors import AttentionInputError, UnsupportedError

_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is, unpatched
_SHARDINGS = ("auto", "zigzag", "contiguous")
_state = threading.local()  # .stack: the settings of the enclosing use_with_torch_context_parallel()


def _torch_parts():
    """``(DTensor, Shard, cp_options)``, or an error saying which torch lacks them."""
    try:
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.experimental import _attention as cp

        cp._cp_options.enable_load_balance  # noqa: B018 (the option we read)
    except (ImportError, AttributeError) as e:
        raise UnsupportedError(
            "torch context parallelism",
            [
                f"torch {torch.__version__} lacks DTensor or experimental context_parallel ({e}); "
                "torch 2.11 and 2.13 have both"
            ],
        ) from None
    return DTensor, Shard, cp._cp_options


def is_dtensor(*xs) -> bool:
    if all(type(x) is torch.Tensor for x in xs):  # the common case, without importing anything
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(x, DTensor) for x in xs)


def torch_cp_active() -> bool:
    """True while torch's CP dispatcher is on (in ``context_parallel`` or after
    ``_enable_context_parallel_dispatcher``): torch's SDPA handlers are in DTensor's handler table."""
    DTensor, _, _ = _torch_parts()
    return (
        torch.ops.aten._scaled_dot_product_flash_attention.default
        in DTensor._op_dispatcher._custom_op_handlers
    )


def torch_sharding(sharding: str = "auto") -> str:
    """attnkit's name for the order torch's CP put the sequence in (see the module docstring)."""
    if sharding not in _SHARDINGS:
        raise AttentionInputError("sharding", f"one of {_SHARDINGS}", repr(sharding))
    if sharding == "auto":
        stack = getattr(_state, "stack", [])
        sharding = stack[-1]["sharding"] if stack else "auto"
    if sharding != "auto":
        return sharding
    _, _, opts = _torch_parts()
    return "zigzag" if torch_cp_active() and opts.enable_load_balance else "contiguous"


def _locals(tensors: dict, seq_dim: int):
    """The local shards of DTensors ``{name: x}``, all ``Shard(seq_dim)`` on one 1-D mesh; and the mesh."""
    DTensor, Shard, _ = _torch_parts()
    mesh, out = None, []
    for name, x in tensors.items():
        if not isinstance(x, DTensor):
            raise AttentionInputError(
                name, "a DTensor like the other inputs (all of q, k, v sharded, or none)", type(x).__name__
            )
        if x.device_mesh.ndim != 1 or tuple(x.placements) != (Shard(seq_dim),):
            raise AttentionInputError(
                name,
                f"a DTensor on a 1-D mesh with placements (Shard({seq_dim}),) (the sequence dim)",
                f"mesh of {x.device_mesh.ndim} dims, placements {tuple(x.placements)}",
                hint="pass the context-parallel sub-mesh (mesh['cp']) and shard only the sequence",
            )
        if mesh is not None and x.device_mesh != mesh:
            raise AttentionInputError(name, "a DTensor on the same mesh as the query", x.device_mesh)
        mesh = x.device_mesh
        out.append(x.to_local())  # differentiable: the gradient comes back as a DTensor of this shard
    return out, mesh


def _settings(sharding="auto", backend="auto", method="auto") -> dict:
    stack = getattr(_state, "stack", [])
    base = stack[-1] if stack else {"backend": "auto", "method": "auto"}
    return {
        "sharding": torch_sharding(sharding),
        "backend": backend if backend != "auto" else base["backend"],
        "method": method if method != "auto" else base["method"],
    }


def sdpa_on_dtensors(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """``F.scaled_dot_product_attention`` on DTensor shards (B, H, S/W, D): attnkit's ring on the locals."""
    from attnkit.distributed._cp import context_parallel_attention

    DTensor, Shard, _ = _torch_parts()
    if attn_mask is not None:
        raise AttentionInputError(
            "attn_mask",
            "None under context parallelism (a dense mask cannot be sharded along both dims)",
            "a tensor",
            hint="use is_causal, or call attnkit.attention(..., mask=attnkit.masks...) on the DTensors",
        )
    if dropout_p:
        raise AttentionInputError("dropout_p", "0.0 under context parallelism", dropout_p)
    (q, k, v), mesh = _locals({"query": query, "key": key, "value": value}, 2)
    if q.dim() != 4:
        raise AttentionInputError("query", "a 4-D (B, H, S, D) DTensor under context parallelism", q.dim())
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise AttentionInputError(
            "enable_gqa", f"True when query has {q.shape[1]} heads and key {k.shape[1]}", enable_gqa
        )
    if is_causal and query.shape[2] != key.shape[2]:
        raise AttentionInputError(
            "is_causal",
            "False when the query and key lengths differ (SDPA aligns causal top-left, attnkit bottom-right)",
            f"True with lengths {query.shape[2]} and {key.shape[2]}",
        )
    s = _settings()
    out = context_parallel_attention(
        q,
        k,
        v,
        group=mesh.get_group(),
        layout="bhsd",
        sharding=s["sharding"],
        causal=bool(is_causal),
        scale=scale,
        backend=s["backend"],
        method=s["method"],
    )
    return DTensor.from_local(out, mesh, [Shard(2)], run_check=False)


# attnkit.attention arguments that context parallelism takes (the others must keep their defaults)
_CP_ARGS = ("q", "k", "v", "layout", "causal", "window", "softcap", "mask", "scale", "return_lse", "backend")
_SEQ = {"bshd": 1, "bhsd": 2}


def attention_on_dtensors(attention, args: dict):
    """``attention(**args)`` (``attnkit.attention``) when q/k/v are DTensors sharded on the sequence."""
    from attnkit.distributed._cp import context_parallel_attention

    DTensor, Shard, _ = _torch_parts()
    defaults = {n: p.default for n, p in inspect.signature(attention).parameters.items()}
    for name, value in args.items():
        default = defaults[name]
        if name in _CP_ARGS or value is default or (not isinstance(value, torch.Tensor) and value == default):
            continue
        raise AttentionInputError(
            name,
            f"its default ({default!r}) when q, k, v are DTensors (context parallelism takes "
            f"{', '.join(_CP_ARGS[3:])})",
            type(value).__name__ if isinstance(value, torch.Tensor) else repr(value),
        )
    layout = args["layout"]
    if layout not in _SEQ:
        raise AttentionInputError("layout", f"one of {tuple(_SEQ)} for DTensor inputs", repr(layout))
    sd = _SEQ[layout]
    (q, k, v), mesh = _locals({"q": args["q"], "k": args["k"], "v": args["v"]}, sd)
    s = _settings(backend=args["backend"])
    res = context_parallel_attention(
        q,
        k,
        v,
        group=mesh.get_group(),
        layout=layout,
        sharding=s["sharding"],
        causal=args["causal"],
        window=args["window"],
        softcap=args["softcap"],
        scale=args["scale"],
        mask=args["mask"],
        return_lse=True,
        backend=s["backend"],
        method=s["method"],
    )
    out, lse = (DTensor.from_local(t, mesh, [Shard(d)], run_check=False) for t, d in zip(res, (sd, 2)))
    return (out, lse) if args["return_lse"] else out


class _SDPAToRing(TorchFunctionMode):
    """SDPA on sequence-sharded DTensors -> attnkit's ring (see :func:`use_with_torch_context_parallel`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA and is_dtensor(*args[:3], *(kwargs.get(n) for n in ("query", "key", "value"))):
            return sdpa_on_dtensors(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def use_with_torch_context_parallel(*, sharding: str = "auto", backend: str = "auto", method: str = "auto"):
    """Run attnkit's context-parallel attention where a model under torch's ``context_parallel`` calls SDPA.

    ::

        from torch.distributed.tensor.experimental import context_parallel
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            with akd.use_with_torch_context_parallel():
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # attnkit's ring
                out.sum().backward()                                            # attnkit's ring backward

    Inside, every ``scaled_dot_product_attention`` call whose query, key and value are DTensors sharded on
    dim 2 of a 1-D mesh (what torch's patched SDPA makes of the local shards, or what a module under
    torch's ``_ContextParallel`` style receives) becomes :func:`context_parallel_attention` on the local
    shards over ``mesh.get_group()``; forward and backward are attnkit's (blocks, merge, ring). Calls on
    plain tensors are not touched. Supported: ``is_causal`` (equal lengths), ``scale``, ``enable_gqa``
    (GQA/MQA); refused with an ``AttentionInputError``: ``attn_mask``, ``dropout_p > 0``. It also sets the
    defaults for ``attnkit.attention`` called on DTensors inside it.

    Args:
        sharding: ``"auto"`` (torch's order: ``zigzag`` = head-tail when torch's CP load balancing is on,
            else ``contiguous``), or ``"zigzag"`` / ``"contiguous"`` to say it (e.g. for a custom
            ``_LoadBalancer``: attnkit serves only these two orders).
        backend: attnkit backend for each block (``"auto"``, ``"reference"``, ...).
        method: ``"auto"``, ``"ring"`` or ``"allgather"`` (see :func:`context_parallel_attention`).
    """
    _torch_parts()
    if sharding not in _SHARDINGS:
        raise AttentionInputError("sharding", f"one of {_SHARDINGS}", repr(sharding))
    stack = _state.__dict__.setdefault("stack", [])
    stack.append({"sharding": sharding, "backend": backend, "method": method})
    try:
        with _SDPAToRing():
            yield
    finally:
        stack.pop()
