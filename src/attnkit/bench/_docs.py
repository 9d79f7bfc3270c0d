"""Tables of the docs generated from the code's own data, so that the docs cannot drift from it.

``docs/backends.md`` holds the output of :func:`triton_rates_table` between the markers
``<!-- triton_rates:begin -->`` / ``<!-- triton_rates:end -->``; ``tests/test_readme.py`` checks that it
equals a fresh rendering. After changing ``src/attnkit/data/triton_rates.json`` run
``python -m attnkit.bench._docs`` to rewrite the block.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path

BEGIN, END = "<!-- triton_rates:begin -->", "<!-- triton_rates:end -->"

# json key prefix -> what the row means (the kernels behind it); rows without a known prefix show the key
_KINDS = {
    "fwd": "forward, Triton kernel",
    "fwd_gluon": "forward, Gluon kernel (sm_90 plain calls), S > 1K",
    "fwd_gluon_short": "forward, Gluon kernel (sm_90 plain calls), Sk <= 1K",
    "fwd_bwd": "forward+backward, Triton kernels",
    "fwd_bwd_gluon": "forward+backward, Gluon dK/dV (sm_90 plain calls), S > 1K",
    "fwd_bwd_gluon_short": "forward+backward, Gluon dK/dV (sm_90 plain calls), Sk <= 1K",
}


def triton_rates() -> dict:
    """``src/attnkit/data/triton_rates.json`` as the triton backend reads it (mode -> head dim -> TFLOP/s)."""
    return json.loads(resources.files("attnkit").joinpath("data/triton_rates.json").read_text())


def triton_rates_table(rates: dict | None = None) -> str:
    """A markdown table of ``rates`` (default :func:`triton_rates`): one row per mode, causal and not side
    by side, one column pair per head dim."""
    rates = triton_rates() if rates is None else rates
    modes = [k for k in rates if not k.startswith("_") and not k.endswith("_causal")]
    dims = sorted({int(d) for k, v in rates.items() if not k.startswith("_") for d in v if d.isdigit()})
    head = "| json key | what | " + " | ".join(f"D={d} | D={d} causal" for d in dims) + " |"
    rule = "|---|---|" + "---|---|" * len(dims)
    lines = [head, rule]
    for m in modes:
        plain, causal = rates.get(m, {}), rates.get(m + "_causal", {})
        cells = [f"{plain.get(str(d), '-')} | {causal.get(str(d), '-')}" for d in dims]
        lines.append(f"| `{m}` | {_KINDS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def block(text: str) -> str | None:
    """The generated block inside ``text`` (between the markers, stripped), or None when it has none."""
    m = re.search(re.escape(BEGIN) + r"(.*?)" + re.escape(END), text, re.S)
    return m.group(1).strip() if m else None


def rewrite(path: str | Path) -> bool:
    """Replace the block in ``path`` with a fresh :func:`triton_rates_table`; True when the file changed."""
    path = Path(path)
    text = path.read_text()
    if block(text) is None:
        raise ValueError(f"{path}: no {BEGIN} ... {END} block")
    new = re.sub(
        re.escape(BEGIN) + r".*?" + re.escape(END),
        lambda _: f"{BEGIN}\n{triton_rates_table()}\n{END}",
        text,
        flags=re.S,
    )
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "docs/backends.md"
    print(f"{target}: {'rewritten' if rewrite(target) else 'already current'}")
