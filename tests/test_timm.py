"""attnkit inside timm Vision Transformers.

On machines without timm the integration runs on attnkit's own ViT (``attnkit.bench._vit_model``, timm's
module structure and parameter names); the tests marked ``real timm`` run where timm is installed (the GPU
machine) and skip cleanly elsewhere. Everything is float64 on the CPU: attnkit and SDPA/plain PyTorch must
agree to float64 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnkit
from attnkit.bench._vit_model import VisionTransformer
from attnkit.integrations import timm as aktimm

F64_TOL = 1e-10  # float64 rounding, amplified through a few blocks and the backward pass


def _tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    cfg.update(kw)
    return VisionTransformer(**cfg).double()


def _grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b, what):
    err = (a - b).abs().max().item()
    assert err <= F64_TOL * max(b.abs().max().item(), 1.0), f"{what}: {err:.3e}"


@pytest.mark.parametrize("qk_norm", [False, True])
def test_swap_keeps_weights_outputs_and_grads(qk_norm):
    ref = _tiny_vit(qk_norm=qk_norm)
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    assert aktimm.swap_attention(model) == 2
    assert list(model.state_dict()) == keys  # checkpoints load both ways
    model.load_state_dict(ref.state_dict())
    assert all(isinstance(b.attn, aktimm.AttnkitAttention) for b in model.blocks)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    (o1, g1), (o2, g2) = _grads(ref, x), _grads(model, x)
    _assert_same(o2, o1, "logits")
    for n in g1:
        _assert_same(g2[n], g1[n], n)


def test_neighborhood_mask_equals_dense_mask():
    ref = _tiny_vit(img_size=48)  # 6 x 6 grid + class token
    model = copy.deepcopy(ref)
    mask = aktimm.neighborhood_mask(model, kernel=3)
    aktimm.swap_attention(model, mask=mask)
    dense = mask.to_dense(1, 1, 37, 37)  # (1, 1, N, N), True = attend
    assert not dense.all() and dense[0, 0, 0].all() and dense[0, 0, :, 0].all()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    # timm's own Attention given the same mask as a dense SDPA mask, block by block.
    h = ref.patch_embed(x)
    h = torch.cat([ref.cls_token.expand(2, -1, -1), h], 1) + ref.pos_embed
    for blk in ref.blocks:
        h = blk(h, attn_mask=dense)
    expected = ref.head(ref.norm(h)[:, 0])
    _assert_same(model(x), expected, "neighborhood logits")


def test_softcap_and_score_mod_options():
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    aktimm.swap_attention(a, softcap=0.5)
    aktimm.swap_attention(b, score_mod=attnkit.mods.softcap(0.5))
    _assert_same(a(x), b(x), "softcap flag vs score_mod")
    assert (a(x) - model(x)).abs().max() > 1e-6  # a cap of 0.5 changes the result


def test_attention_fn_hook_and_attn_mask_argument():
    model = _tiny_vit()
    calls = []

    def plain(q, k, v, *, scale, dropout_p=0.0, mask=None, **_):
        calls.append(mask)
        s = (q * scale) @ k.transpose(-2, -1)
        return s.softmax(-1) @ v

    swapped = copy.deepcopy(model)
    aktimm.swap_attention(swapped, attention_fn=plain)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    _assert_same(swapped(x), model(x), "attention_fn")
    assert len(calls) == 2
    # An SDPA-style boolean attn_mask given to the block reaches attnkit as a mask.
    attn = copy.deepcopy(model.blocks[0].attn)
    mine = aktimm.AttnkitAttention(copy.deepcopy(attn))
    tokens = torch.randn(2, 17, 32, dtype=torch.float64)
    m = torch.rand(2, 1, 17, 17) > 0.3
    m[..., 0] = True
    _assert_same(mine(tokens, attn_mask=m), attn(tokens, attn_mask=m), "attn_mask")
    _assert_same(mine(tokens, is_causal=True), attn(tokens, is_causal=True), "is_causal")


def test_swap_rejects_models_without_attention():
    with pytest.raises(ValueError, match="no timm-style attention"):
        aktimm.swap_attention(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="unknown options"):
        aktimm.AttnkitAttention(_tiny_vit().blocks[0].attn, colour="blue")


# -- real timm (installed on the GPU machine) ----------------------------------------------------------------
def _timm():
    return pytest.importorskip("timm", reason="timm is not installed here (real-timm tests run where it is)")


def test_real_timm_vit_swap_matches_sdpa():
    timm = _timm()
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ref = (
        TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5).double().eval()
    )
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    assert aktimm.swap_attention(model) == 2 and list(model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    (o1, g1), (o2, g2) = _grads(ref, x), _grads(model, x)
    _assert_same(o2, o1, "timm logits")
    for n in g1:
        _assert_same(g2[n], g1[n], n)
    assert timm.__version__


def test_real_timm_block_fn_and_checkpoint_roundtrip():
    _timm()
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5, qk_norm=True)
    ref = TimmViT(**kw).double().eval()
    mask = attnkit.masks.neighborhood_2d(4, 4, 3, num_prefix_tokens=1)
    model = TimmViT(**kw, block_fn=aktimm.block_fn(mask=mask)).double().eval()
    model.load_state_dict(ref.state_dict())  # same keys
    assert all(isinstance(b.attn, aktimm.AttnkitAttention) for b in model.blocks)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dense = mask.to_dense(1, 1, 17, 17)
    expected = ref.forward_head(ref.forward_features(x, attn_mask=dense)) if _takes_attn_mask(ref) else None
    got = model(x)
    if expected is not None:
        _assert_same(got, expected, "timm neighborhood")


def _takes_attn_mask(model) -> bool:
    import inspect

    return "attn_mask" in inspect.signature(model.forward_features).parameters
