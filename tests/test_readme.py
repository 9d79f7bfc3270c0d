"""The docs say what is true: the README's program runs, generated tables equal their source, the CPU
ranking is what ``auto`` does, citations point at files the repository has, the pins are what is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.bench import _docs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_the_readme_program_runs(capsys):
    """The README's API example is a complete program: it runs here (CPU or GPU) as it stands."""
    blocks = _python_blocks(README.read_text())
    assert len(blocks) == 1, "the README has one python program; update this test when it has more"
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "chosen:" in out and "torch.Size" in out


def test_backends_md_triton_rates_are_generated_from_the_json():
    text = (ROOT / "docs" / "backends.md").read_text()
    assert _docs.block(text) == _docs.triton_rates_table(), "run: python -m attnkit.bench._docs"


def test_triton_rates_table_shows_every_json_entry():
    rates = _docs.triton_rates()
    table = _docs.triton_rates_table(rates)
    for mode, dims in rates.items():
        if mode.startswith("_"):
            continue
        base = mode.removesuffix("_causal")
        row = next(line for line in table.splitlines() if line.startswith(f"| `{base}` "))
        for value in dims.values():
            assert f" {value} " in row, (mode, value, row)


def _ranking() -> list[str]:
    text = (ROOT / "docs" / "backends.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("<!-- cpu_ranking -->"))
    return re.findall(r"`(\w+)`", line)


@pytest.mark.parametrize("S", [16, 256])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "lse"])
def test_backends_md_cpu_ranking_is_what_auto_does(S, grad, feature):
    kw = {"plain": {}, "causal": {"causal": True}, "window": {"window": (4, 0)}, "lse": {"return_lse": True}}
    q = torch.randn(1, 2, S, 16, requires_grad=grad)
    k, v = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    report = attnkit.explain(q, k, v, **kw[feature])
    capable = [c.name for c in report.candidates if c.status in ("chosen", "capable")]
    # the interpreter's backends (tests set TRITON_INTERPRET=1): never chosen, always last
    interpreted = [n for n in capable if n in ("triton", "triton_decode")]
    assert capable[len(capable) - len(interpreted) :] == interpreted, capable
    ranked = [n for n in capable if n not in interpreted]
    doc = _ranking()
    assert ranked == [n for n in doc if n in ranked], (ranked, doc)
    assert report.chosen == ranked[0]


CITED = re.compile(r"(?<![\w/.])(API|STYLE|ANCHORS)\.md")


def test_citations_point_at_files_in_the_repository():
    """Nothing cites API.md / STYLE.md / ANCHORS.md (not in the repository): docs/api.md, docs/anchors.md."""
    bad = []
    for top in ("src", "tests", "docs", "scripts", "bench"):
        for path in (ROOT / top).rglob("*"):
            if path.suffix not in (".py", ".md", ".json", ".sh", ".txt") or "results" in path.parts:
                continue
            if path == Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if CITED.search(line) or "shared/" in line and ".md" in line:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    for path in (README, ROOT / "pyproject.toml"):
        bad += [f"{path.name}: {x}" for x in path.read_text().splitlines() if CITED.search(x)]
    assert not bad, "\n".join(bad)


# links to docs other branches add at the same time (kept honest by the lead's merge)
_ADDED_ELSEWHERE = {"docs/masks.md", "docs/decoding.md", "docs/distributed.md"}


def test_readme_links_exist():
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    missing = [x for x in links if not (ROOT / x).exists() and x not in _ADDED_ELSEWHERE]
    assert links and not missing, missing


def _pins(section: str = r"^dependencies = \[(.*?)^\]") -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(section, text, re.S | re.M).group(1)
    return {re.match(r"[\w-]+", d).group(0): d for d in re.findall(r'"([^"]+)"', deps)}


def test_the_installed_versions_are_the_pinned_ones():
    """Test what is pinned: the suite runs on the versions pyproject.toml allows (triton exactly 3.6.0)."""
    pytest.importorskip("packaging")
    from packaging.requirements import Requirement

    pins = _pins()
    assert set(pins) >= {"torch", "triton", "numpy"}
    assert "==3.6.0" in pins["triton"]
    for name, spec in pins.items():
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = metadata.version(name).split("+")[0]
        assert req.specifier.contains(version, prereleases=True), (name, version, spec)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU suite: the dev extra's numpy bound holds too
        spec = _pins(r"^dev = \[(.*?)\]$")["numpy"]
        version = metadata.version("numpy")
        assert Requirement(spec).specifier.contains(version), ("numpy", version, spec)


def test_attnkit_info_prints_no_warning():
    """The pinned set is warning-free (no "Failed to initialize NumPy" and the like)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run(
        [sys.executable, "-m", "attnkit", "info"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    warned = [x for x in (r.stdout + r.stderr).splitlines() if "warn" in x.lower()]
    assert not warned, warned


def test_gpu_scripts_say_when_to_run_and_patch_nothing():
    """scripts/gpu/ holds how the project checks and times itself on a GPU: each says when to run it, and
    none patches library internals (assigning to an attnkit module's attribute, setattr on one)."""
    scripts = sorted((ROOT / "scripts" / "gpu").iterdir())
    assert scripts
    patch = re.compile(r"setattr\(|^\s*(ops|_tuning|_launch|_gluon\w*|gf|launch|attnkit\.\w+)\.\w+ = ", re.M)
    for path in scripts:
        text = path.read_text()
        assert "when to run" in text.lower(), path.name
        assert not patch.search(text), (path.name, patch.search(text).group(0))
    assert {p.name for p in (ROOT / "scripts").iterdir()} == {"gpu", "test.sh"}
