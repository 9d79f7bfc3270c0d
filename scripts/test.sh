#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (CPU-only is fine: Triton kernels run through the
# interpreter there). This is the command README.md gives and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same pinned set as the README's main job (triton and numpy pins live in pyproject.toml), plus extras.
python3 -m pip install -q "torch==2.13.0" -e ".[dev,hf]"
python3 -m ruff check src tests scripts
python3 -m pytest -q "$@"
