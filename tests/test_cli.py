"""The command line: bad input is one line and exit status 2, explain's CPU default dtype, ``bench --help``
lists every suite, ``info`` prints a value for every field."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from attnkit import cli

BAD_EXPLAIN = [
    (["--shape", "2,4,128"], "--shape"),
    (["--shape", "2,x,4,8"], "--shape"),
    (["--window", "8"], "--window"),
    (["--backend", "nope"], "backend"),
    (["--shape", "1,2,16,8", "--hk", "3"], ""),  # Hq=2 not a multiple of Hk=3: attnkit's own error
    (["--shape", "1,2,16,8", "--window", "-5,0"], "window"),
    (["--mask", "nope"], "--mask"),
    (["--device", "nope"], "--device"),
    (["--dtype", "fp8"], "--dtype"),
]


@pytest.mark.parametrize("argv, names", BAD_EXPLAIN, ids=[" ".join(a) for a, _ in BAD_EXPLAIN])
def test_explain_bad_input_is_one_line_and_exit_2(argv, names, capsys):
    assert cli.main(["explain", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit explain: error: "), err
    assert names in lines[0] and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_explain_device_cuda_on_a_cpu_machine(capsys):
    assert cli.main(["explain", "--device", "cuda", "--shape", "1,2,16,8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device" in err


def test_bad_command_and_bad_suite_are_one_line(capsys):
    assert cli.main(["nope"]) == 2
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("attnkit: error:") and "'nope'" in err[1], err
    assert "quick, kernels, vit, packed" in err[1]


def test_the_installed_entry_point_prints_no_traceback():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, "-m", "attnkit", "explain", "--shape", "2,4,128"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


def test_explain_dtype_defaults_to_the_device(capsys):
    assert cli.main(["explain", "--shape", "1,2,16,8"]) == 0
    want = "torch.bfloat16 on cuda" if torch.cuda.is_available() else "torch.float32 on cpu"
    assert want in capsys.readouterr().out
    assert cli.main(["explain", "--shape", "1,2,16,8", "--device", "cpu"]) == 0
    assert "torch.float32 on cpu" in capsys.readouterr().out
    assert cli.main(["explain", "--shape", "1,2,16,8", "--device", "cpu", "--dtype", "bf16"]) == 0
    assert "torch.bfloat16 on cpu" in capsys.readouterr().out


def test_explain_good_window_and_shape(capsys):
    assert cli.main(["explain", "--shape", "1,2,16,8", "--device", "cpu", "--window", "4,0"]) == 0
    assert "window=(4, 0)" in capsys.readouterr().out


def test_bench_help_lists_every_registered_suite(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("quick", "kernels", "vit", "packed", *cli.BENCH_SUITES):
        assert f"  {name} " in out, (name, out)
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    assert all(name in top for name in cli.BENCH_SUITES)


def test_every_registered_suite_has_a_main():
    import importlib

    for name, (mod, text) in cli.BENCH_SUITES.items():
        assert callable(importlib.import_module(mod).main) and text, name


@pytest.mark.parametrize("interpret", [None, "1"])
def test_info_prints_triton_interpret_as_a_value(interpret, capsys, monkeypatch):
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    if data["device"]["device"] == "cpu":
        value = data["device"]["triton_interpret"]
        assert value == (interpret or "0 (unset)")
    assert cli.main(["info"]) == 0
    for line in capsys.readouterr().out.splitlines():
        assert line.strip() and len(line.split()) >= 2 or line.strip() in ("device", "backends"), line
