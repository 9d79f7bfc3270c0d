"""Shared output of the benchmarks in this folder: environment record, progress, table, CSV/JSON files."""

from __future__ import annotations

import csv
import datetime as _dt
import importlib
import json
import os
import platform

import torch


def environment() -> dict:
    """GPU (or CPU), library versions and the date: recorded with every result file."""
    import attnkit

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "attnkit": attnkit.__version__,
    }
    for mod in ("triton", "timm", "transformers"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except Exception:
            env[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(
            device="cuda",
            gpu=p.name,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        )
    else:
        env.update(
            device="cpu",
            gpu=None,
            cpu=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
        )
    return env


def progress(items, desc: str):
    """tqdm when installed, else the plain iterable with a one-line header."""
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False)
    except ImportError:
        print(f"{desc}: {len(items)} runs")
        return items


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Fixed-width text table of ``rows`` over (key, header) columns; floats get 4 significant digits."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(out)


def write(rows: list[dict], env: dict, out_dir: str, stem: str) -> tuple[str, str]:
    """Write ``{stem}.csv`` (one row per result, environment columns appended) and ``{stem}.json``."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path = os.path.join(out_dir, f"{stem}.csv"), os.path.join(out_dir, f"{stem}.json")
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    env_keys = [k for k in ("gpu", "torch", "triton", "attnkit", "timm", "date") if k in env]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + [f"env_{k}" for k in env_keys])
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{f"env_{k}": env.get(k) for k in env_keys}})
    with open(json_path, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=2, default=str)
    return csv_path, json_path
