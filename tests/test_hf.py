"""attnkit as a Hugging Face transformers attention implementation, end to end on tiny random models.

Models are built offline from configs (no downloads) in float64. Transformers' eager attention computes its
softmax in float32 even for float64 models, so it is not exact: a result passes when its error against eager
float64 is at most twice eager's own float32 error (eager fp32 against eager fp64, tests/oracle.py's rule)
plus a float64 floor. attnkit against attnkit (packed, padded, one by one) must agree to float64 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    masking_utils,  # noqa: E402
)

import attnkit  # noqa: E402
from attnkit.integrations import hf as akhf  # noqa: E402
from attnkit.packing import FlattenCollator, FlattenCollatorForMLM  # noqa: E402

# Features of newer transformers: encoders on AttentionInterface and bidirectional masks (5.x), mask
# functions described by q_length/q_offset (>= 4.56), set_attn_implementation (>= 4.54).
HAS_BIDIRECTIONAL = hasattr(masking_utils, "create_bidirectional_mask")
HAS_Q_LENGTH_MASKS = "q_length" in __import__("inspect").signature(masking_utils.sdpa_mask).parameters
HAS_SET_ATTN = hasattr(transformers.PreTrainedModel, "set_attn_implementation")
needs = pytest.mark.skipif

F64_FLOOR = 1e-12
VOCAB = 97
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "gemma2": (
        "Gemma2Config",
        {
            "sliding_window": 4,
            "head_dim": 8,
            "attn_logit_softcapping": 5.0,
            "query_pre_attn_scalar": 10,
            "final_logit_softcapping": 7.0,
        },
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    akhf.register()


def _config(family: str):
    name, extra = FAMILIES[family]
    return getattr(transformers, name)(**TINY, **extra)


def _models(family: str, *impls: str, dtype=torch.float64, auto=AutoModelForCausalLM, config=None):
    """One model per implementation, same weights (each gets its own config copy: from_config sets the
    implementation on the config object it is given)."""
    cfg = config if config is not None else _config(family)
    torch.manual_seed(1234)
    first = auto.from_config(copy.deepcopy(cfg), attn_implementation=impls[0]).to(dtype).eval()
    out = [first]
    for impl in impls[1:]:
        m = auto.from_config(copy.deepcopy(cfg), attn_implementation=impl).to(dtype).eval()
        m.load_state_dict(first.state_dict())
        out.append(m)
    return out


def _within(err: float, budget: float, scale: float, what: str):
    assert err == err, f"{what}: NaN"
    assert err <= 2 * budget + F64_FLOOR * max(scale, 1.0), (
        f"{what}: error {err:.3e}, eager's fp32 error {budget:.3e}"
    )


def _seqs(lengths):
    return [torch.randint(3, VOCAB, (n,)) for n in lengths]


# -- logits and gradients against eager ---------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_grads_match_eager(family):
    eager64, attn64 = _models(family, "eager", "attnkit")
    eager32 = copy.deepcopy(eager64).float()
    ids = torch.randint(3, VOCAB, (2, 11))  # longer than the sliding window (4)
    results = {}
    for name, model in (("e64", eager64), ("a64", attn64), ("e32", eager32)):
        model.train()  # dropout is 0 in these configs; train mode exercises the training path
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.logits.double().detach(), grads)
    (le, ge), (la, ga), (l32, g32) = results["e64"], results["a64"], results["e32"]
    _within((la - le).abs().max().item(), (l32 - le).abs().max().item(), le.abs().max().item(), "logits")
    assert ge.keys() == ga.keys()
    for n in ge:
        _within(
            (ga[n] - ge[n]).abs().max().item(),
            (g32[n] - ge[n]).abs().max().item(),
            ge[n].abs().max().item(),
            f"grad {n}",
        )


def test_gqa_reaches_attnkit_without_repeated_kv(monkeypatch):
    (model,) = _models("llama", "attnkit")
    seen = []
    real = attnkit.attention

    def spy(q, k, v, **kw):
        seen.append((q.shape, k.shape, kw.get("layout"), kw.get("causal")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(akhf.attnkit, "attention", spy)
    model(torch.randint(3, VOCAB, (2, 6)))
    assert len(seen) == TINY["num_hidden_layers"]
    for qs, ks, layout, causal in seen:
        assert layout == "bhsd" and causal is True
        assert qs[1] == TINY["num_attention_heads"] and ks[1] == TINY["num_key_value_heads"]


def test_window_and_softcap_reach_attnkit_as_flags(monkeypatch):
    (model,) = _models("gemma2", "attnkit")
    seen = []
    real = attnkit.attention
    monkeypatch.setattr(
        akhf.attnkit, "attention", lambda q, k, v, **kw: seen.append(kw) or real(q, k, v, **kw)
    )
    model(torch.randint(3, VOCAB, (1, 9)))
    windows = {kw["window"] for kw in seen}
    assert windows == {None, (3, 0)}  # Gemma 2 alternates sliding (window 4: 3 back) and full layers
    assert all(kw["softcap"] == 5.0 for kw in seen)
    assert all("bias" not in kw and "mask" not in kw for kw in seen)


# -- packed batches --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("how", ["position_ids", "flash_kwargs", "padded_to_multiple"])
def test_packed_batch_equals_sequences_one_by_one(family, how):
    (model,) = _models(family, "attnkit")
    seqs = _seqs((9, 3, 6))
    collator = FlattenCollator(
        return_flash_attn_kwargs=how == "flash_kwargs",
        pad_to_multiple_of=8 if how == "padded_to_multiple" else None,
    )
    batch = collator([{"input_ids": s} for s in seqs])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # No use_cache=False: the model builds a cache, so transformers' own mask code misses the packing.
    packed = model(**inputs).logits[0]
    assert packed.shape[0] == (24 if how == "padded_to_multiple" else 18)
    off = 0
    for s in seqs:
        alone = model(s[None]).logits[0]
        err = (packed[off : off + len(s)] - alone).abs().max().item()
        assert err <= F64_FLOOR * max(alone.abs().max().item(), 1.0), err
        off += len(s)


def test_packed_training_loss_matches_separate_sequences():
    eager, model = _models("mistral", "eager", "attnkit")
    seqs = _seqs((7, 5))
    batch = FlattenCollator()([{"input_ids": s} for s in seqs])
    packed_loss = model(**batch, use_cache=False).loss
    # The separator label drops each sequence's first token, so token counts match the separate runs.
    losses = [eager(s[None], labels=s[None], use_cache=False).loss for s in seqs]
    counts = [len(s) - 1 for s in seqs]
    expected = sum(loss * c for loss, c in zip(losses, counts)) / sum(counts)
    eager32 = copy.deepcopy(eager).float()
    l32 = sum(eager32(s[None], labels=s[None], use_cache=False).loss * c for s, c in zip(seqs, counts)) / sum(
        counts
    )
    _within(
        abs(packed_loss.item() - expected.item()), abs(l32.item() - expected.item()), expected.item(), "loss"
    )


# -- padding -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_honoured(family, side):
    (model,) = _models(family, "attnkit")
    seqs = _seqs((9, 4, 7))
    S = 9
    ids = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(S - len(s), S) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for i, s in enumerate(seqs):
        sl = slice(S - len(s), S) if side == "left" else slice(0, len(s))
        alone = model(s[None]).logits[0]
        err = (logits[i, sl] - alone).abs().max().item()
        assert err <= F64_FLOOR * max(alone.abs().max().item(), 1.0), err


def test_padding_holes_under_a_sliding_window_match_eager():
    """A padding mask with holes inside rows, under a sliding window (the dense, absolute-position path):
    valid query rows equal eager's, whose window counts absolute distances across the holes."""
    eager64, attn64 = _models("mistral", "eager", "attnkit")
    eager32 = copy.deepcopy(eager64).float()
    ids = torch.randint(3, VOCAB, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, 3:5] = 0  # holes inside the row: removing them would shorten window distances
    mask[1, 6] = 0
    logits = {
        n: m(ids, attention_mask=mask).logits.double()
        for n, m in (("e64", eager64), ("a64", attn64), ("e32", eager32))
    }
    valid = mask.bool()
    err = (logits["a64"] - logits["e64"])[valid].abs().max().item()
    base = (logits["e32"] - logits["e64"])[valid].abs().max().item()
    _within(err, base, logits["e64"][valid].abs().max().item(), "logits")


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_left_padded_matches_eager_one_by_one(family, cache):
    eager, model = _models(family, "eager", "attnkit")
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation=cache)
    out = model.generate(ids, attention_mask=mask, **kw)
    assert out[0].tolist() == eager.generate(ids[:1], **kw)[0].tolist()
    assert out[1, 2:].tolist() == eager.generate(ids[1:, 2:], **kw)[0].tolist()


# -- encoders ------------------------------------------------------------------------------------------------
def _bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return _models("bert", "eager", "attnkit", auto=AutoModel, config=cfg)


@needs(not HAS_BIDIRECTIONAL, reason="encoders use AttentionInterface from transformers 5")
def test_bidirectional_encoder_with_padding_and_packed_mlm():
    eager, model = _bert()
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    he, ha = (m(ids, attention_mask=mask).last_hidden_state for m in (eager, model))
    valid = mask.bool()
    # BERT's eager softmax runs in the model dtype: both are exact in float64.
    assert (he - ha)[valid].abs().max().item() <= F64_FLOOR * max(he.abs().max().item(), 1.0)

    seqs = _seqs((5, 7, 3))
    batch = FlattenCollatorForMLM(
        mask_token_id=1,
        vocab_size=VOCAB,
        mlm_probability=0.3,
        pad_to_multiple_of=8,
        generator=torch.Generator().manual_seed(0),
    )([{"input_ids": s} for s in seqs])
    packed = model(batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state[0]
    off = 0
    for s in seqs:
        x = batch["input_ids"][0, off : off + len(s)]
        alone = eager(x[None]).last_hidden_state[0]
        assert (packed[off : off + len(s)] - alone).abs().max().item() <= F64_FLOOR * max(
            alone.abs().max().item(), 1
        )
        off += len(s)


# -- masks transformers builds -------------------------------------------------------------------------------
@needs(not HAS_Q_LENGTH_MASKS, reason="mask functions take q_length from transformers 4.56")
def test_mask_function_returns_structure_not_dense_masks():
    from transformers import masking_utils as mu

    (model,) = _models("mistral", "attnkit")
    cfg = model.config
    emb = torch.zeros(2, 6, 8, dtype=torch.float64)
    pos = torch.arange(6)[None].expand(2, 6)
    assert mu.create_causal_mask(cfg, emb, None, None, position_ids=pos) is None
    assert mu.create_sliding_window_causal_mask(cfg, emb, None, None, position_ids=pos) is None
    assert mu.create_causal_mask(cfg, emb, torch.ones(2, 6, dtype=torch.long), None, position_ids=pos) is None
    pad = torch.ones(2, 6, dtype=torch.long)
    pad[0, :2] = 0
    got = mu.create_causal_mask(cfg, emb, pad, None, position_ids=pos)
    assert got.shape == (2, 6) and got.dtype == torch.bool and torch.equal(got, pad.bool())

    # An arbitrary overlay cannot be expressed by flags: transformers' dense mask, exactly.
    def overlay(b, h, q, kv):
        return (q + kv) % 3 != 0

    dense = mu.create_causal_mask(cfg, emb, pad, None, position_ids=pos, and_mask_function=overlay)
    cfg_sdpa = copy.deepcopy(cfg)
    cfg_sdpa._attn_implementation = "sdpa"
    expected = mu.create_causal_mask(cfg_sdpa, emb, pad, None, position_ids=pos, and_mask_function=overlay)
    assert dense.dim() == 4 and torch.equal(dense, expected)


@needs(not HAS_BIDIRECTIONAL, reason="bidirectional sliding windows from transformers 5")
def test_classify_and_window_match_transformers_masks():
    from transformers import masking_utils as mu

    assert akhf.classify_mask_function(mu.causal_mask_function)["causal"] is True
    d = akhf.classify_mask_function(mu.sliding_window_causal_mask_function(5))
    assert d["causal"] and d["sliding_window"] == 5
    assert akhf.classify_mask_function(lambda b, h, q, kv: q >= kv) is None
    for causal in (True, False):
        w = 5
        fn = (
            mu.sliding_window_causal_mask_function(w)
            if causal
            else mu.sliding_window_bidirectional_mask_function(w)
        )
        q, kv = torch.arange(12)[:, None], torch.arange(12)[None, :]
        want = fn(torch.tensor(0), torch.tensor(0), q, kv)
        got = attnkit.masks.sliding_window(*akhf.hf_window(w, causal)).to_dense(1, 1, 12, 12)[0, 0]
        if causal:
            got = got & (kv <= q)
        assert torch.equal(got, want.expand(12, 12))


def test_dense_4d_masks_and_additive_masks():
    eager, model = _models("llama", "eager", "attnkit")
    ids = torch.randint(3, VOCAB, (2, 7))
    q, kv = torch.arange(7)[:, None], torch.arange(7)[None, :]
    allowed = ((kv <= q) & ((q - kv) % 3 != 1))[None, None].expand(2, 1, 7, 7)
    neg = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float64)
    additive = torch.where(allowed, torch.zeros((), dtype=torch.float64), neg)
    le = eager(ids, attention_mask=additive).logits
    l32 = copy.deepcopy(eager).float()(ids, attention_mask=additive.float()).logits
    for m in (allowed, additive):
        la = model(ids, attention_mask=m).logits
        _within(
            (la - le).abs().max().item(), (l32.double() - le).abs().max().item(), le.abs().max().item(), "4d"
        )


@needs(not HAS_SET_ATTN, reason="set_attn_implementation from transformers 4.54")
def test_set_attn_implementation_switches_back_and_forth():
    eager, model = _models("qwen2", "eager", "eager")
    ids = torch.randint(3, VOCAB, (1, 8))
    before = model(ids).logits
    model.set_attn_implementation("attnkit")
    assert model.config._attn_implementation == "attnkit"
    e32 = copy.deepcopy(eager).float()(ids).logits.double()
    _within(
        (model(ids).logits - before).abs().max().item(),
        (e32 - before).abs().max().item(),
        before.abs().max().item(),
        "switched",
    )


def test_old_transformers_fail_clearly(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.3")
    with pytest.raises(RuntimeError, match="transformers >= 4.53"):
        akhf.register("attnkit_old")


def test_packed_offsets_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, mx = akhf.packed_offsets(pos, 1, 9)
    assert cu.tolist() == [0, 3, 5, 9] and mx == 4 and cu.dtype == torch.int32
    assert akhf.packed_offsets(torch.arange(9)[None], 1, 9) is None
    # Rows of a batch are sequences of their own; a 1-row position tensor is shared by every row.
    cu, _ = akhf.packed_offsets(torch.tensor([[0, 1, 0, 1]]), 2, 4)
    assert cu.tolist() == [0, 2, 4, 6, 8]


# -- decode steps on the KV-cache path ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_static_cache_decode_steps_run_attention_with_kvcache(monkeypatch, dtype):
    """Greedy generate with a StaticCache gives eager's tokens, and its decode steps (one query token, the
    cache's future slots beyond L) run through attnkit.attention_with_kvcache on the cache in place."""
    eager, model = _models("llama", "eager", "attnkit", dtype=dtype)
    calls = []
    real = attnkit.attention_with_kvcache

    def counting(q, k_cache, v_cache, **kw):
        calls.append((tuple(q.shape), tuple(k_cache.shape), kw["cache_seqlens"].tolist()))
        return real(q, k_cache, v_cache, **kw)

    monkeypatch.setattr(attnkit, "attention_with_kvcache", counting)
    ids = torch.randint(3, VOCAB, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert out.tolist() == eager.generate(ids, attention_mask=torch.ones_like(ids), **kw).tolist()
    steps = [lens[0] for shape, _, lens in calls if shape[1] == 1]  # (B, 1, Hq, D): one new token a step
    # the cache holds 5 + 6 - 1 = 10 slots; the last step fills it (no future slots: a plain attention call)
    assert sorted(set(steps)) == [6, 7, 8, 9], calls  # keys 0..L-1 of the cache
    assert len(steps) == TINY["num_hidden_layers"] * 4, calls
    assert all(k_shape[1] == 10 for _, k_shape, _ in calls)  # the whole static cache, read in place


def test_decode_steps_read_the_padding_mask_once_per_step(monkeypatch):
    """Every layer of a step gets the same padding mask: whether it is all ones is read from the device
    once (a sync), not once per layer; an in-place change or a new mask is read again."""
    from attnkit.integrations import hf

    reads = []
    real = torch.Tensor.all
    monkeypatch.setattr(torch.Tensor, "all", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    pm = torch.ones(2, 7, dtype=torch.bool)
    assert all(hf._all_true(pm) for _ in range(4)) and len(reads) == 1
    pm[1, 3] = False
    assert not hf._all_true(pm) and len(reads) == 2
    assert hf._all_true(torch.ones(2, 7, dtype=torch.bool)) and len(reads) == 3
    with torch.inference_mode():
        inf = torch.ones(2, 7, dtype=torch.bool)
    assert hf._all_true(inf) and hf._all_true(inf) and len(reads) == 5
