"""Shared test configuration.

- On machines without CUDA, Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` is set here,
  before any test module (or attnkit) imports triton.
- ``@pytest.mark.cuda`` tests are skipped cleanly when no GPU is present.
- Every test starts from a fixed, test-specific seed (``seed`` fixture gives its value), so a failure
  reproduces by rerunning the one test; inputs are still fresh random numbers, never zeros.
- Hypothesis profiles: ``ci`` (default, few examples) and ``dev`` (many), chosen by ``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
import sys
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Test helper modules (oracle.py) are importable from every test file as `import oracle`.
sys.path.insert(0, os.path.dirname(__file__))

HAS_CUDA = torch.cuda.is_available()

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: long-running")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """The seed this test runs under (stable per test id)."""
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _seed_everything(seed):
    torch.manual_seed(seed)
    if HAS_CUDA:
        torch.cuda.manual_seed_all(seed)
    yield


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _clean_attnkit_env(monkeypatch):
    """Tests never inherit a forced backend or debug logging from the caller's shell."""
    monkeypatch.delenv("ATTNKIT_BACKEND", raising=False)
    monkeypatch.delenv("ATTNKIT_DEBUG", raising=False)
    yield


@pytest.fixture
def poison_triton_outputs(monkeypatch):
    """Our Triton kernels' outputs start as NaN, so any element a kernel forgets to write fails the oracle
    (test modules of the triton backend use it: ``pytestmark = pytest.mark.usefixtures(...)``)."""
    from attnkit.backends.triton.ops import common

    monkeypatch.setattr(common, "POISON", True)
    yield
