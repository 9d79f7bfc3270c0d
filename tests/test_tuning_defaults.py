"""The tile defaults the H200 measurements chose where the per-head-dim default was wrong (runtime/tuning.py):
a masked forward at D=128 (the default overflows shared memory with the mask's bounds) and dQ of short causal
calls at D=128; every other call keeps the shipped default."""

import pytest
import torch

tuning = pytest.importorskip("attnkit.backends.triton.runtime.tuning")

H200_SMEM = 232448


@pytest.fixture(autouse=True)
def _h200(monkeypatch):
    monkeypatch.setattr(tuning, "_smem_limit", lambda device: H200_SMEM)


def test_hints_read_the_flags():
    assert tuning.hints({"HAS_IV": True, "HAS_RIGHT": True, "HAS_LEFT": False}) == {"iv", "causal"}
    assert tuning.hints({"HAS_IV": False, "HAS_RIGHT": True, "HAS_LEFT": True}) == frozenset()


def test_masked_forward_takes_tiles_that_fit():
    dev = torch.device("cuda", 0)
    plain = tuning.fitting_default("fwd", 128, 128, torch.bfloat16, dev)
    masked = tuning.fitting_default("fwd", 128, 128, torch.bfloat16, dev, frozenset({"iv"}), 8192)
    assert plain == tuning.default_config("fwd", 128, 128)  # dense calls: unchanged
    assert masked == (64, 64, 4, 2)
    for kind in ("dkdv", "dq"):  # the backward's tiles leave room for the bounds too
        cfg = tuning.fitting_default(kind, 128, 128, torch.bfloat16, dev, frozenset({"iv"}), 8192)
        extra = 16 * cfg[1] * cfg[3] + 4096
        assert tuning._smem_estimate(kind, cfg, 128, 128, 2) + extra <= H200_SMEM


def test_short_causal_dq_tiles():
    dev = torch.device("cuda", 0)
    causal = frozenset({"causal"})
    assert tuning.fitting_default("dq", 128, 128, torch.bfloat16, dev, causal, 512) == (64, 32, 4, 3)
    long = tuning.fitting_default("dq", 128, 128, torch.bfloat16, dev, causal, 4096)
    assert long == tuning.default_config("dq", 128, 128)
    assert tuning.fitting_default("dq", 128, 128, torch.bfloat16, dev, frozenset(), 512) == long
