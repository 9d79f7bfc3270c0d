"""attnkit.packing: pack/unpack, offsets from position ids, and the flattening collators."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.packing import (
    FlattenCollator,
    FlattenCollatorForMLM,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    pack,
    unpack,
)


def test_pack_roundtrip_and_metadata():
    seqs = [torch.randn(n, 3, 4) for n in (3, 0, 5, 1)]
    flat, cu, mx, pos = pack(seqs)
    assert flat.shape == (9, 3, 4)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8, 9]
    assert mx == 5 and pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    for a, b in zip(unpack(flat, cu), seqs):
        assert torch.equal(a, b)


def test_pack_pads_with_a_dummy_sequence():
    seqs = [torch.randn(n, 2) for n in (3, 4)]
    packed = pack(seqs, pad_to_multiple_of=8, pad_value=-1.0)
    assert packed.values.shape == (8, 2) and packed.cu_seqlens.tolist() == [0, 3, 7, 8]
    assert torch.equal(packed.values[7], torch.full((2,), -1.0))
    assert pack(seqs, pad_to_multiple_of=7).cu_seqlens.tolist() == [0, 3, 7]  # already a multiple
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        pack(seqs, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="trailing shape"):
        pack([torch.randn(2, 3), torch.randn(2, 4)])


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    cu, mx = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9] and mx == 4
    # Any start (RoBERTa starts at padding_idx + 1), and every batch row starts a sequence.
    cu, mx = cu_seqlens_from_position_ids(torch.tensor([[2, 3, 4, 2, 3], [2, 3, 4, 5, 6]]))
    assert cu.tolist() == [0, 3, 5, 10] and mx == 5
    assert cu_seqlens_from_lengths([2, 0, 3]).tolist() == [0, 2, 2, 5]


def test_packed_attention_equals_one_by_one():
    """The packed layout that pack() builds is what attention(layout='thd') takes."""
    lens = (5, 1, 8)
    qs = [torch.randn(n, 4, 8, dtype=torch.float64) for n in lens]
    ks = [torch.randn(n, 2, 8, dtype=torch.float64) for n in lens]
    vs = [torch.randn(n, 2, 8, dtype=torch.float64) for n in lens]
    q, cu, mx, _ = pack(qs)
    k, v = pack(ks).values, pack(vs).values
    out = attnkit.attention(
        q, k, v, layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx, causal=True
    )
    for o, qi, ki, vi in zip(unpack(out, cu), qs, ks, vs):
        alone = attnkit.attention(qi[None], ki[None], vi[None], layout="bshd", causal=True)[0]
        assert (o - alone).abs().max().item() <= 1e-12


def test_flatten_collator_matches_transformers():
    transformers = pytest.importorskip("transformers")
    plain = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}, {"input_ids": torch.tensor([4])}]
    labelled = [
        {"input_ids": [5, 6, 7], "labels": [1, 2, 3]},
        {"input_ids": [8, 9], "labels": torch.tensor([4, 5])},
    ]
    options = (
        {},
        {"return_flash_attn_kwargs": True, "return_seq_idx": True},
        {"position_ids_start": 2},
        {"return_position_ids": False, "separator_id": -1},
    )
    for feats in (plain, labelled):
        for kw in options:
            ours = FlattenCollator(**kw)(feats)
            theirs = transformers.DataCollatorWithFlattening(**kw)(feats)
            assert ours.keys() == theirs.keys()
            for key in ours:
                if isinstance(theirs[key], torch.Tensor):
                    assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
                else:
                    assert ours[key] == theirs[key], key


def test_flatten_collator_pads_to_multiple():
    feats = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    b = FlattenCollator(
        pad_to_multiple_of=4, pad_token_id=0, return_flash_attn_kwargs=True, return_seq_idx=True
    )(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and b["max_length_q"] == 3
    assert b["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]] and b["seq_idx"].dtype == torch.int32
    assert cu_seqlens_from_position_ids(b["position_ids"])[0].tolist() == b["cu_seq_lens_q"].tolist()
    np_batch = FlattenCollator(pad_to_multiple_of=4)(feats, return_tensors="np")
    assert np_batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]


def test_mlm_collator_masks_after_flattening():
    n_tok = 4000
    feats = [{"input_ids": torch.randint(10, 50, (n,)).tolist()} for n in (1000, 1500, 1500)]
    b = FlattenCollatorForMLM(
        mask_token_id=3,
        vocab_size=50,
        mlm_probability=0.2,
        special_token_ids=(10,),
        pad_to_multiple_of=4096,
        generator=torch.Generator().manual_seed(0),
    )(feats)
    ids, labels = b["input_ids"][0], b["labels"][0]
    original = torch.tensor(sum((f["input_ids"] for f in feats), []) + [0] * 96)
    chosen = labels != -100
    assert ids.shape == (4096,) and b["position_ids"][0, n_tok:].tolist() == list(range(96))
    assert not chosen[n_tok:].any() and not chosen[original == 10].any()  # padding and special tokens
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(ids[~chosen], original[~chosen])
    frac = chosen[:n_tok].float().mean().item()
    assert 0.17 < frac < 0.23  # 0.2 over 4000 tokens: 5 standard deviations is about 0.03
    masked = (ids[chosen] == 3).float().mean().item()
    assert 0.7 < masked < 0.9
