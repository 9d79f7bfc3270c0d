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
    assert tuning.hints({}, gathers=True) == {"gather"}


def test_score_mods_that_gather_take_narrow_key_tiles():
    """A forward whose score mod reads a captured table: (64, 32, 4, 2), measured 2x the fitting retry of
    the default for a learnable T5 bias (tuning.py); the dQ and dK/dV defaults do not move."""
    dev = torch.device("cuda", 0)
    gather = frozenset({"gather"})
    assert tuning.fitting_default("fwd", 128, 128, torch.bfloat16, dev, gather, 8192) == (64, 32, 4, 2)
    masked = tuning.fitting_default("fwd", 128, 128, torch.bfloat16, dev, gather | {"iv"}, 8192)
    assert masked == (64, 32, 4, 2)
    for kind in ("dkdv", "dq"):
        assert tuning.fitting_default(kind, 128, 128, torch.bfloat16, dev, gather, 8192) == (
            tuning.fitting_default(kind, 128, 128, torch.bfloat16, dev, frozenset(), 8192)
        )


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


def test_a_tile_shape_the_gpu_refuses_falls_back_to_smaller_tiles_and_is_remembered():
    """On the H200 a compiled score mod that gathers from a table needed 480 KB of shared memory at the
    default forward tiles (the estimate counts K/V only): the launch retries the largest smaller tiles that
    compile, remembers them for that key, and other errors still raise."""
    import torch

    from attnkit.backends.triton.runtime import tuning

    class OutOfResources(Exception):
        pass

    tried = []

    def launch(cfg):
        tried.append(cfg)
        if cfg[0] * cfg[1] > 64 * 64:
            raise OutOfResources("out of resource: shared memory")
        return cfg

    key = ("test-key", object())
    big = (128, 128, 8, 3)
    got = tuning.launch_fitting("fwd", big, key, launch, 128, 128, torch.bfloat16)
    assert got[0] * got[1] <= 64 * 64 and tried[0] == big and len(tried) > 1
    assert tuning.shrunk("fwd", big, key) == got
    tried.clear()
    assert tuning.launch_fitting("fwd", big, key, launch, 128, 128, torch.bfloat16) == got
    assert tried == [got]  # remembered: no retry of the refused shape

    def broken(cfg):
        raise ValueError("not a resource problem")

    with pytest.raises(ValueError):
        tuning.launch_fitting("fwd", big, ("other",), broken, 128, 128, torch.bfloat16)

    def never(cfg):
        raise OutOfResources("out of resource: shared memory")

    with pytest.raises(OutOfResources):
        tuning.launch_fitting("dq", (128, 64, 8, 2), ("third",), never, 128, 128, torch.bfloat16)
