"""timm integration: run timm Vision Transformers' attention through attnkit.

Usage::

    import timm
    from attnkit.integrations import timm as aktimm

    model = timm.create_model("vit_base_patch16_224")
    aktimm.swap_attention(model)                                   # every Attention module, in place
    aktimm.swap_attention(model, mask=aktimm.neighborhood_mask(model, kernel=7))  # 2-D neighborhood
    aktimm.swap_attention(model, softcap=30.0)                     # or any attnkit flag / score_mod

    # or at construction time:
    model = timm.models.VisionTransformer(..., block_fn=aktimm.block_fn(mask=...))

The replacement, :class:`AttnkitAttention`, keeps the original module's submodules under their names
(``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``), so
``state_dict`` keys are unchanged and checkpoints load both ways. It computes exactly what timm's
``Attention`` computes (fused QKV, per-head q/k norms, ``scale``, attention dropout in training, the
``attn_mask``/``is_causal`` arguments of recent timm, output norm and gate) and hands the attention itself to
:func:`attnkit.attention` with the options given to :func:`swap_attention`.

timm is imported lazily and only by :func:`block_fn`; modules are recognised by their structure (a ``qkv``
``nn.Linear``, ``num_heads``, ``proj``), so equivalent ViTs that are not timm's work too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import attnkit
from attnkit.masks import Mask, from_mask_mod, neighborhood_2d

_PARTS = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")
_OPTIONS = ("mask", "score_mod", "softcap", "causal", "window", "alibi_slopes", "backend", "deterministic")


def is_timm_attention(module: nn.Module) -> bool:
    """True for modules shaped like timm's ``Attention``: fused ``qkv`` Linear, ``num_heads``, ``proj``."""
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "proj", None), nn.Module)
        and not isinstance(module, AttnkitAttention)
    )


class AttnkitAttention(nn.Module):
    """timm ``Attention`` computed by :func:`attnkit.attention` (same submodules, same state_dict keys).

    Args:
        source: the timm ``Attention`` (or structurally equal) module whose submodules are taken over.
        mask: an :class:`attnkit.masks.Mask` or ``mask_mod`` applied to every call (e.g.
            :func:`neighborhood_mask`), combined with any ``attn_mask`` the model passes.
        score_mod, softcap, causal, window, alibi_slopes, backend, deterministic: as in
            :func:`attnkit.attention`.
        attention_fn: the function called as ``attention_fn(q, k, v, **kwargs)`` on (B, H, N, D) tensors;
            :func:`attnkit.attention` by default (benchmarks pass plain PyTorch or SDPA here).
    """

    def __init__(self, source: nn.Module, *, attention_fn: Callable | None = None, **options):
        super().__init__()
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(
                f"AttnkitAttention: unknown options {sorted(unknown)}; expected some of {_OPTIONS}"
            )
        if not is_timm_attention(source):
            raise TypeError(
                f"AttnkitAttention: {type(source).__name__} is not shaped like timm's Attention "
                "(needs a `qkv` nn.Linear, an int `num_heads` and a `proj` module)"
            )
        self.num_heads = source.num_heads
        qkv_out = source.qkv.out_features
        self.head_dim = int(getattr(source, "head_dim", qkv_out // 3 // self.num_heads))
        self.attn_dim = int(getattr(source, "attn_dim", self.num_heads * self.head_dim))
        if self.attn_dim * 3 != qkv_out:
            raise TypeError(f"AttnkitAttention: qkv gives {qkv_out} features, expected 3 x {self.attn_dim}")
        self.scale = float(getattr(source, "scale", self.head_dim**-0.5))
        self.fused_attn = True
        for name in _PARTS:
            part = getattr(source, name, None)
            if name == "gate":
                self.gate = part  # None unless the module is gated
            else:
                setattr(self, name, part if part is not None else nn.Identity())
        mask = options.get("mask")
        if mask is not None and not isinstance(mask, Mask):
            options["mask"] = from_mask_mod(mask)
        self.options = options
        self.attention_fn = attention_fn if attention_fn is not None else attnkit.attention
        self.source_class = type(source).__name__

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in self.options.items() if v is not None)
        head = f"from {self.source_class}, heads={self.num_heads}, head_dim={self.head_dim}"
        return f"{head}, {opts}" if opts else head

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, **kwargs
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) each
        q, k = self.q_norm(q), self.k_norm(k)
        opts = dict(self.options)
        if is_causal:
            opts["causal"] = True
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                given = _dense_bool_mask(attn_mask)
                opts["mask"] = given if opts.get("mask") is None else opts["mask"] & given
            else:
                opts["bias"] = attn_mask
        dropout = self.attn_drop.p if self.training and isinstance(self.attn_drop, nn.Dropout) else 0.0
        x = self.attention_fn(
            q,
            k,
            v,
            scale=self.scale,
            dropout_p=dropout,
            **{k_: v_ for k_, v_ in opts.items() if v_ is not None},
        )  # (B, H, N, D)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


def _dense_bool_mask(m: torch.Tensor) -> Mask:
    """A Mask reading an SDPA-style boolean mask broadcastable to (B, H, N, N)."""
    m4 = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    B1, H1, Q1 = m4.shape[0] == 1, m4.shape[1] == 1, m4.shape[2] == 1

    def mod(b, h, q, kv):
        return m4[b * 0 if B1 else b, h * 0 if H1 else h, q * 0 if Q1 else q, kv]

    return from_mask_mod(mod, "attn_mask")


def swap_attention(model: nn.Module, *, attention_fn: Callable | None = None, **options) -> int:
    """Replace every timm-style attention module of ``model`` (in place) by :class:`AttnkitAttention`.

    Args:
        model: a timm ``VisionTransformer`` (or any module tree holding timm-style attention modules).
        attention_fn: see :class:`AttnkitAttention`.
        **options: ``mask``, ``score_mod``, ``softcap``, ``causal``, ``window``, ``alibi_slopes``,
            ``backend``,
            ``deterministic``: passed to :func:`attnkit.attention` on every call.

    Returns:
        The number of modules replaced (0 raises: nothing looked like timm attention).
    """
    targets = [(name, mod) for name, mod in model.named_modules() if is_timm_attention(mod)]
    if not targets:
        raise ValueError(f"swap_attention: no timm-style attention module found in {type(model).__name__}")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = AttnkitAttention(mod, attention_fn=attention_fn, **options)
        if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
            parent[int(child)] = new
        else:
            setattr(parent, child, new)
    return len(targets)


def block_fn(base: Callable | None = None, *, attention_fn: Callable | None = None, **options) -> Callable:
    """A ``block_fn`` for ``timm.models.VisionTransformer(block_fn=...)`` whose attention runs on attnkit.

    Args:
        base: the block class to build (timm's ``Block`` by default).
        attention_fn, **options: see :func:`swap_attention`.
    """

    def make_block(*args, **kwargs):
        nonlocal base
        if base is None:
            from timm.models.vision_transformer import Block

            base = Block
        block = base(*args, **kwargs)
        swap_attention(block, attention_fn=attention_fn, **options)
        return block

    return make_block


def neighborhood_mask(model: nn.Module, kernel: int) -> Mask:
    """2-D neighborhood mask for a ViT's token grid (``patch_embed.grid_size``), prefix tokens seeing all."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise ValueError(
            "neighborhood_mask: the model has no patch_embed.grid_size; use "
            "attnkit.masks.neighborhood_2d(height, width, kernel, num_prefix_tokens) directly"
        )
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    return neighborhood_2d(int(grid[0]), int(grid[1]), kernel, num_prefix_tokens=prefix)


__all__ = ["AttnkitAttention", "block_fn", "is_timm_attention", "neighborhood_mask", "swap_attention"]
