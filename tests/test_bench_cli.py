"""The benchmarks run end to end on a CPU: ``attnkit bench`` (quick suite) and ``attnkit bench vit``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnkit import cli
from attnkit.bench import quick, vit


def test_quick_suite_runs_and_writes_results(tmp_path, capsys):
    assert quick.main(["--budget-ms", "2", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "auto (" in text and "torch_sdpa" in text
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    rows = data["results"]
    assert rows and all(r["ms"] is not None for r in rows if r["note"] is None)
    assert not [r for r in rows if r["note"]], [r["note"] for r in rows if r["note"]]
    assert (tmp_path / "quick.csv").read_text().startswith("shape,")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU timing: on a GPU machine the parallel test workers share the GPU"
)
def test_quick_suite_rows_have_a_sane_spread_on_cpu(tmp_path):
    """Warmed up until settled, a row's time is near its fastest call (the first CPU run once showed rows
    15-75x the steady time, cold calls counted)."""
    assert quick.main(["--budget-ms", "15", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quick.json").read_text())["results"]
    spreads = {(r["shape"], r["causal"], r["mode"], r["backend"]): r["spread"] for r in rows}
    assert spreads and all(s is not None and s >= 0 for s in spreads.values()), spreads
    wide = {k: s for k, s in spreads.items() if s >= 2}  # fastest round's median >= 3x the fastest call
    assert not wide, wide


def test_the_timer_warms_up_until_the_time_settles():
    """The first calls are 30x slower (lazy initialisation): they must not reach the median."""
    import time

    from attnkit.bench import _timing

    calls = [0]

    def fn():
        calls[0] += 1
        time.sleep(0.03 if calls[0] <= 6 else 0.001)

    t = _timing.measure(fn, on_gpu=False, budget_ms=30)
    assert t.warmup >= 6 and t.samples >= 5
    assert t.ms < 10, t  # 1 ms steady (sleep overshoots under load), 30 ms cold
    assert t.spread >= 0 and t.min_ms <= t.ms


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU path: on a GPU this would run the full benchmark"
)
def test_bench_vit_through_the_cli_on_cpu(tmp_path, capsys):
    rc = cli.main(["bench", "vit", "--steps", "1", "--warmup", "1", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tiny" in text and "no GPU here" in text
    rows = json.loads((tmp_path / "vit.json").read_text())["results"]
    ran = {(r["experiment"], r["impl"]) for r in rows if r["median_ms"] is not None}
    assert {
        ("dense", "plain"),
        ("dense", "attnkit"),
        ("softcap", "attnkit"),
        ("neighborhood", "attnkit"),
    } <= ran
    errors = [r["note"] for r in rows if (r["note"] or "").startswith("error")]
    assert not errors, errors
    skipped = [r for r in rows if r["median_ms"] is None]
    assert all(r["note"] for r in skipped)  # every skip says why


def test_vit_plan_matches_the_anchor_configurations():
    assert vit.CONFIGS["short"] == dict(
        img_size=224, patch_size=16, batch=128, num_heads=16, head_dim=64, depth=24
    )
    assert vit.CONFIGS["long"] == dict(
        img_size=224, patch_size=4, batch=8, num_heads=12, head_dim=64, depth=6
    )
    args = vit._parser().parse_args(["--configs", "short,long", "--modes", "eager,compiled"])
    runs = vit.plan(args, torch.device("cuda"))
    assert ("short", "dense", "sdpa_cudnn", "compiled") in runs and (
        "long",
        "softcap",
        "flex",
        "eager",
    ) in runs
    assert not [r for r in runs if r[0] == "short" and r[1] != "dense"]  # extra experiments on "long" only


def test_bench_packed_through_the_cli_on_cpu(tmp_path, capsys):
    pytest.importorskip("transformers")
    argv = ["bench", "packed", "--tiny", "--out", str(tmp_path), "--steps", "1", "--warmup", "0"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "packed" in out and "padded" in out
    rows = json.loads((tmp_path / "packed.json").read_text())["results"]
    assert {(r["batch"], r["attention"]) for r in rows} == {
        ("padded", "sdpa"),
        ("padded", "attnkit"),
        ("packed", "attnkit"),
    }
    assert all(r.get("median_ms", 0) > 0 for r in rows), [r.get("note") for r in rows]
    packed = next(r for r in rows if r["batch"] == "packed")
    assert packed["computed_tokens"] == packed["real_tokens"]  # no pad token computed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sweep: on a GPU this would run the full table")
def test_bench_kernels_alternates_rounds_and_keeps_the_median(tmp_path, monkeypatch):
    """Every backend of a shape is timed once a round, in turn; each row keeps its median round and says
    how far its rounds spread."""
    from attnkit.bench import kernels

    order = []

    def timer(step, on_gpu):  # each step's rounds read 3, 1, 2 ms
        order.append(step)
        return (3.0, 1.0, 2.0)[order.count(step) - 1]

    monkeypatch.setattr(kernels, "_timer", timer)
    assert kernels.main(["--rounds", "3", "--out", str(tmp_path), "--modes", "fwd", "--no-causal"]) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())
    per_shape = len(rows) // len(kernels.CPU_SHAPES)
    assert per_shape >= 2
    # within a shape: every backend once a round (not A three times, then B), round r starting at backend r
    first = order[: 3 * per_shape]
    rs = [first[i * per_shape : (i + 1) * per_shape] for i in range(3)]
    assert len(set(rs[0])) == per_shape and all(sorted(map(id, r)) == sorted(map(id, rs[0])) for r in rs)
    assert [r[0] for r in rs] == [rs[0][i % per_shape] for i in range(3)]
    if per_shape >= 3:  # and nobody follows the same backend in rounds 0 and 1
        before = [{id(b): a for a, b in zip(r, r[1:])} for r in rs[:2]]
        assert all(a is not before[0].get(b) for b, a in before[1].items())
    for r in rows:
        assert r["rounds"] == 3 and r["error"] == ""
    # each backend's rounds read 3, 1, 2: median 2, spread (3 - 1) / 2
    assert all(r["ms"] == 2.0 and r["spread"] == 1.0 for r in rows), rows


@pytest.mark.parametrize("n", range(1, 10))
def test_round_order_varies_each_backends_predecessor(n):
    from attnkit.bench.kernels import round_order

    orders = [round_order(n, r) for r in range(3)]
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert [o[0] for o in orders] == [r % n for r in range(3)]
    pred = [{b: a for a, b in zip(o, o[1:])} for o in orders]
    distinct = sum(1 for m in range(1, n) if math.gcd(m, n) == 1)  # rounds before a step repeats
    for r1 in range(min(3, distinct)):
        for r2 in range(r1):
            assert all(pred[r1][x] != pred[r2].get(x) for x in pred[r1]), (n, orders)


def test_bench_masks_through_the_cli_cpu_smoke(tmp_path, capsys):
    """``attnkit bench masks`` runs end to end on a CPU (the interpreter): every case and backend gets a
    row with a time or a reason, and the new-packing rows are there (compiles: 0 under the interpreter,
    where nothing compiles; the GPU run is where that claim means something)."""
    argv = ["bench", "masks", "--shape", "1,2,32,16", "--backends", "triton,flex,auto", "--modes", "fwd"]
    argv += ["--metadata", "64", "--cases", "document,prefix-lm,sliding,shared,relative,neighborhood_2d"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "masks.json").read_text())["results"]
    kinds = {r["case"].split()[0] for r in rows}
    assert {"document", "prefix-LM", "sliding", "shared", "relative", "neighborhood_2d"} <= kinds, kinds
    assert {"same", "a", "kernels", "new"} <= kinds, kinds
    for r in rows:
        assert (r.get("ms") is not None) != (r.get("error") is not None) or "compiles" in r, r
    assert all(r["ms"] > 0 for r in rows if r["backend"] == "triton" and "ms" in r and r["ms"] is not None)
    assert [r["compiles"] for r in rows if "compiles" in r] == [0]
    assert "masks" in capsys.readouterr().out


def test_bench_masks_cases_keep_first_word_starts():
    """``--cases global`` keeps "global_sliding 64 + 1024" (run H asked for it so and got no row), matching
    is case-blind, and a word that starts no case's first word keeps none of them."""
    import torch

    from attnkit.bench.masks import cases, kept

    names = list(cases(256, 2, torch.Generator().manual_seed(0), "cpu"))
    pick = lambda keep: [n for n in names if kept(n, keep)]  # noqa: E731
    assert pick({"global"}) == [n for n in names if n.startswith("global_sliding")]
    assert pick({"prefix-lm"}) == [n for n in names if n.startswith("prefix-LM")]
    assert pick({"nothing"}) == [] and pick(None) == names


def test_bench_masks_auto_label_is_asked_as_its_row_ran(monkeypatch):
    """The ``auto (backend)`` label of a forward row is the pick without grad (as that row is timed), of a
    forward+backward row the pick with grad: one label for both had shown the forward+backward pick on the
    forward rows of run G."""
    import attnkit
    from attnkit.bench import masks as bench_masks

    seen = []
    real = attnkit.explain

    def explain(*a, **kw):
        seen.append(torch.is_grad_enabled())
        return real(*a, **kw)

    monkeypatch.setattr(attnkit, "explain", explain)
    shape, modes = (1, 2, 32, 16), ["fwd", "fwd_bwd"]
    rows = bench_masks.mask_rows(shape, modes, False, torch.float32, ("auto",), ["prefix-lm"])
    assert [r["mode"] for r in rows if r["backend"].startswith("auto (")] == ["fwd", "fwd_bwd"], rows
    assert seen == [False, True]
