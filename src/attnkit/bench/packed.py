"""``attnkit bench packed``: a Llama training step on mixed-length documents, padded versus packed.

The same documents (lengths drawn once from a long-tailed distribution, fixed seed) are fed three ways:

- ``padded/sdpa``: a (N, max_len) batch with a padding mask, transformers' SDPA attention;
- ``padded/attnkit``: the same padded batch with ``attn_implementation="attnkit"`` (attnkit removes the
  padding inside attention, but every other layer still computes on the pad tokens);
- ``packed/attnkit``: one (1, T) row of all documents back to back, restarting ``position_ids``
  (``attnkit.packing``), attention as a packed ``thd`` call: no pad token anywhere;
- ``packed/attnkit:NAME`` for each optional peer installed here (``flash_attn4``, ``flex_flash``,
  ``xformers``): the same packed run with ``ATTNKIT_BACKEND=NAME`` (a peer that cannot serve the call is
  recorded with its reasons).

Each runs forward, loss, backward and an SGD step under bf16 autocast; the table gives the median step
time and real (non-pad) tokens per second. On a CPU it runs a tiny model and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from attnkit.bench import _report

GPU_MODEL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)
CPU_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)


def _lengths(n_docs: int, max_len: int, seed: int) -> list[int]:
    """Long-tailed document lengths in [16, max_len] (log-uniform), reproducible."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.log(torch.tensor(16.0)), torch.log(torch.tensor(float(max_len)))
    return [int(torch.exp(lo + (hi - lo) * torch.rand((), generator=g))) for _ in range(n_docs)]


def _batches(lengths: list[int], vocab: int, device):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    max_len = max(lengths)
    ids = torch.zeros(len(docs), max_len, dtype=torch.long)
    attn = torch.zeros(len(docs), max_len, dtype=torch.long)
    labels = torch.full((len(docs), max_len), -100, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = d
        attn[i, : len(d)] = 1
        labels[i, : len(d)] = d
    padded = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    packed_ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed_labels = torch.cat([torch.cat([torch.tensor([-100]), d[1:]]) for d in docs])[None]
    packed = {"input_ids": packed_ids, "position_ids": positions, "labels": packed_labels}
    move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    return move(padded), move(packed)


def _step_time(model, batch, steps: int, warmup: int, device) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with amp:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench packed", description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=None, help="documents per step (default 48 GPU, 6 CPU)")
    p.add_argument("--max-len", type=int, default=None, help="longest document (default 2048 GPU, 64 CPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="the tiny CPU model and sizes, on any device")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("attnkit bench packed needs transformers (pip install 'attnkit[hf]')")
        return 2
    from attnkit.integrations import hf as akhf

    akhf.register()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        print("attnkit bench packed: no GPU here; tiny model on the CPU (checks the pipeline, not timings).")
    big = on_gpu and not args.tiny
    model_cfg = GPU_MODEL if big else CPU_MODEL
    n_docs = args.docs or (48 if big else 6)
    max_len = args.max_len or (2048 if big else 64)
    steps = args.steps or (10 if big else 2)
    lengths = _lengths(n_docs, max_len, seed=0)
    padded, packed = _batches(lengths, model_cfg["vocab_size"], device)
    real = sum(lengths)
    env = _report.environment()
    rows = []
    runs = [("padded", "sdpa", None, padded), ("padded", "attnkit", None, padded)]
    runs += [("packed", "attnkit", None, packed)] + [("packed", "attnkit", p, packed) for p in _peers()]
    for name, impl, peer, batch in runs:
        cfg = transformers.LlamaConfig(**model_cfg)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).to(device)
        row = dict(
            batch=name,
            attention=impl if peer is None else f"{impl}:{peer}",
            docs=n_docs,
            real_tokens=real,
            computed_tokens=int(batch["input_ids"].numel()),
        )
        try:
            with _forced_backend(peer):
                ms = _step_time(model, batch, steps, args.warmup, device)
            row.update(median_ms=ms, real_tokens_per_s=real / ms * 1e3)
        except Exception as e:  # record and go on
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    best = min((r["median_ms"] for r in rows if r.get("median_ms")), default=None)
    for r in rows:
        if r.get("median_ms") and best:
            r["vs_best"] = r["median_ms"] / best
    print(
        f"\nattnkit bench packed on {env.get('gpu') or env.get('cpu')} (torch {env['torch']}, "
        f"transformers {env.get('transformers')}, attnkit {env['attnkit']}, {env['date']})"
    )
    print(
        f"{n_docs} documents, {real} real tokens, longest {max(lengths)}; "
        f"Llama {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads"
    )
    print(
        _report.table(
            rows,
            [
                ("batch", "batch"),
                ("attention", "attention"),
                ("computed_tokens", "tokens"),
                ("median_ms", "ms/step"),
                ("real_tokens_per_s", "real tok/s"),
                ("vs_best", "x best"),
                ("note", "note"),
            ],
        )
    )
    csv_path, json_path = _report.write(rows, env, args.out, "packed")
    print(f"\nwrote {csv_path} and {json_path}")
    return 0


def _peers() -> list[str]:
    """The optional peer backends available here."""
    import attnkit

    ok = {r.name for r in attnkit.backends() if r.available}
    return [n for n in ("flash_attn4", "flex_flash", "xformers") if n in ok]


@contextlib.contextmanager
def _forced_backend(name: str | None):
    """``ATTNKIT_BACKEND=name`` for the block (nothing when name is None)."""
    if name is None:
        yield
        return
    old = os.environ.get("ATTNKIT_BACKEND")
    os.environ["ATTNKIT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTNKIT_BACKEND", None)
        else:
            os.environ["ATTNKIT_BACKEND"] = old


if __name__ == "__main__":
    raise SystemExit(main())
