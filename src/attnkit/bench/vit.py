"""``attnkit bench vit``: the seed blog's ViT training experiment, every attention in one run.

A Vision Transformer (timm's when installed, else :mod:`attnkit.bench._vit_model`, same structure) trains
on random images in bf16 autocast with SGD; the median step time (forward, backward, optimizer step; CUDA
events, one synchronised step at a time after warm-up) is reported for each attention implementation,
eager and ``torch.compile``d:

- ``plain``: matmul, softmax, matmul in PyTorch;
- ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``, ``sdpa_math``: ``F.scaled_dot_product_attention``
  pinned to one SDPA backend;
- ``flex``: FlexAttention (compiled kernel, also in eager mode);
- ``attnkit``: :func:`attnkit.attention` with ``backend="auto"``; ``attnkit_triton``: ``backend="triton"``;
- the optional peers through attnkit's adapters, where installed: ``attnkit_flash_attn4`` (FlashAttention-4,
  the seed blog's FlashAttention-3 row's successor), ``attnkit_flex_flash`` (FlexAttention FLASH),
  ``attnkit_xformers``.

Experiments: ``dense`` (plain attention), ``softcap`` (tanh soft-capping of the scores) and
``neighborhood`` (2-D neighborhood mask over the patch grid, class token global). Configurations
(docs/anchors.md): ``short`` (224px, patch 16, seq 197, batch 128, 16 heads x 64, depth 24) and ``long``
(224px, patch 4, seq 3137, batch 8, 12 heads x 64, depth 6); on a CPU only ``tiny`` runs, which says so.
Unavailable implementations are skipped with a note; a failing one is recorded with its error.
Results: a table, ``vit.csv``/``vit.json`` (GPU, versions, date) and ``vit.png`` (matplotlib) in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench import _report
from attnkit.integrations import timm as aktimm

CONFIGS = {
    "short": dict(img_size=224, patch_size=16, batch=128, num_heads=16, head_dim=64, depth=24),
    "long": dict(img_size=224, patch_size=4, batch=8, num_heads=12, head_dim=64, depth=6),
    "tiny": dict(img_size=32, patch_size=8, batch=4, num_heads=2, head_dim=16, depth=2),
}
SDPA = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}
EXPERIMENTS = {
    "dense": [
        "plain",
        "sdpa_flash",
        "sdpa_cudnn",
        "sdpa_efficient",
        "sdpa_math",
        "flex",
        "attnkit",
        "attnkit_triton",
        "attnkit_flash_attn4",
        "attnkit_flex_flash",
        "attnkit_xformers",
    ],
    "softcap": ["plain", "flex", "attnkit", "attnkit_triton", "attnkit_flash_attn4", "attnkit_flex_flash"],
    "neighborhood": [
        "plain",
        "sdpa_efficient",
        "sdpa_cudnn",
        "flex",
        "attnkit",
        "attnkit_triton",
        "attnkit_flex_flash",
    ],
}
# the optional peers, run through attnkit's adapters (skipped with a note where their package is missing)
PEERS = {
    "attnkit_flash_attn4": "flash_attn4",
    "attnkit_flex_flash": "flex_flash",
    "attnkit_xformers": "xformers",
}


# -- attention implementations: attention_fn(q, k, v, *, scale, ...) on (B, H, N, D) -------------------------
def _plain(q, k, v, *, scale, dropout_p=0.0, softcap=None, dense_mask=None, **_):
    s = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if dense_mask is not None:
        s = s.masked_fill(~dense_mask, float("-inf"))
    return s.softmax(dim=-1) @ v


def _sdpa(q, k, v, *, scale, dropout_p=0.0, dense_mask=None, **_):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, scale=scale)


_FLEX = None


def _flex_kernel():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _make_flex(softcap, block_mask):
    score_mod = None
    if softcap is not None:

        def score_mod(s, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(s / softcap)

    kernel = _flex_kernel()

    def fn(q, k, v, *, scale, **_):
        return kernel(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)

    return fn


def _make_attnkit(backend, softcap, mask):
    def fn(q, k, v, *, scale, dropout_p=0.0, **_):
        return attnkit.attention(q, k, v, scale=scale, softcap=softcap, mask=mask, backend=backend)

    return fn


def _why_unavailable(impl: str, device: torch.device) -> str | None:
    if impl.startswith("sdpa_") and device.type != "cuda" and impl != "sdpa_math":
        return "needs CUDA"
    if impl == "flex" and device.type != "cuda":
        return "compiled FlexAttention needs CUDA here"
    if impl == "attnkit_triton" and device.type != "cuda":
        return "Triton runs only through its interpreter on a CPU (not a timing)"
    if impl.startswith("attnkit"):
        name = "triton" if impl == "attnkit_triton" else PEERS.get(impl)
        if name is not None:
            rec = {b.name: b for b in attnkit.backends()}.get(name)
            if rec is None:
                return f"attnkit backend {name!r} is not part of this build"
            if not rec.available:
                return f"attnkit {name}: {rec.reason}"
    return None


# -- the model -----------------------------------------------------------------------------------------------
def build_model(cfg: dict, device: torch.device):
    """(model, source): timm's VisionTransformer when importable, else attnkit's own equivalent."""
    kw = dict(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        embed_dim=cfg["num_heads"] * cfg["head_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        num_classes=1000,
    )
    try:
        from timm.models.vision_transformer import VisionTransformer

        source = "timm"
    except ImportError:
        from attnkit.bench._vit_model import VisionTransformer

        source = "attnkit.bench._vit_model"
    with torch.device(device):
        model = VisionTransformer(**kw)
    aktimm.swap_attention(model, attention_fn=_plain)
    return model, source


def _set_attention(model, fn: Callable, options: dict):
    for m in model.modules():
        if isinstance(m, aktimm.AttnkitAttention):
            m.attention_fn = fn
            m.options = dict(options)


def _variant(impl: str, experiment: str, model, args, device, seq: int):
    """(attention_fn, module options, context manager factory) for one implementation and experiment."""
    softcap = args.softcap if experiment == "softcap" else None
    mask = dense = block = None
    if experiment == "neighborhood":
        mask = aktimm.neighborhood_mask(model, args.kernel)
        if impl == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            mm = mask.mask_mod
            block = create_block_mask(
                lambda b, h, q, kv: mm(b, h, q, kv), None, None, seq, seq, device=device
            )
        elif not impl.startswith("attnkit"):
            dense = mask.to_dense(1, 1, seq, seq, device=device)
    ctx = contextlib.nullcontext
    if impl == "plain":
        fn = _plain
    elif impl in SDPA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA[impl])
        fn, ctx = _sdpa, (lambda: sdpa_kernel([backend]))
    elif impl == "flex":
        fn = _make_flex(softcap, block)
    else:
        backend = "triton" if impl == "attnkit_triton" else PEERS.get(impl, "auto")
        fn = _make_attnkit(backend, softcap, mask)
    options = {"softcap": softcap, "dense_mask": dense} if not impl.startswith(("attnkit", "flex")) else {}
    return fn, {k: v for k, v in options.items() if v is not None}, ctx


# -- timing --------------------------------------------------------------------------------------------------
def _time_steps(model, cfg, device, mode, compile_how, steps, warmup, ctx) -> dict:
    B = cfg["batch"]
    x = torch.randn(B, 3, cfg["img_size"], cfg["img_size"], device=device)
    y = torch.randint(0, 1000, (B,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    forward = model
    if mode == "compiled":
        torch._dynamo.reset()
        if compile_how == "regional":
            blocks = [m for m in model.modules() if type(m).__name__ in ("Block", "ResPostBlock")]
            for b in blocks:
                b.compile()
        else:
            forward = torch.compile(model)
    on_gpu = device.type == "cuda"
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        with amp:
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    with ctx():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        first_s = time.perf_counter() - t0
        for _ in range(steps):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loss = step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                loss = step()
                times.append((time.perf_counter() - t) * 1e3)
    if mode == "compiled" and compile_how == "regional":
        for m in model.modules():
            if hasattr(m, "_compiled_call_impl"):
                m._compiled_call_impl = None  # back to eager for the next variant
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "warmup_s": round(first_s, 2),
        "loss": float(loss.detach()),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }


# -- command line --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit bench vit", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        default=None,
        help="comma list of short,long,tiny (default: short,long on a GPU, tiny on a CPU)",
    )
    p.add_argument(
        "--experiments", default="dense,softcap,neighborhood", help="comma list of " + ",".join(EXPERIMENTS)
    )
    p.add_argument("--impls", default=None, help="comma list restricting implementations (default: all)")
    p.add_argument("--modes", default=None, help="eager,compiled (default: both on a GPU, eager on a CPU)")
    p.add_argument(
        "--compiled-impls", default=None, help="comma list: implementations also run compiled (default: all)"
    )
    p.add_argument(
        "--compile",
        dest="compile_how",
        choices=("full", "regional"),
        default="full",
        help="torch.compile the whole model, or each transformer block (faster to compile)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--softcap", type=float, default=30.0, help="soft-cap value of the softcap experiment")
    p.add_argument("--kernel", type=int, default=7, help="neighborhood size of the neighborhood experiment")
    p.add_argument("--extra-experiments-on", default="long", help="configs that run softcap/neighborhood")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; skip (and note) runs after this")
    p.add_argument("--out", default="bench_out/vit", help="folder for vit.csv, vit.json, vit.png")
    p.add_argument("--no-plot", action="store_true")
    return p


def plan(args, device) -> list[tuple[str, str, str, str]]:
    """(config, experiment, impl, mode) runs in order."""
    configs = (
        args.configs.split(",")
        if args.configs
        else (["short", "long"] if device.type == "cuda" else ["tiny"])
    )
    extra_on = set(args.extra_experiments_on.split(",")) | ({"tiny"} if "tiny" in configs else set())
    only = set(args.impls.split(",")) if args.impls else None
    compiled_only = set(args.compiled_impls.split(",")) if args.compiled_impls else None
    modes = (
        args.modes.split(",")
        if args.modes
        else (["eager", "compiled"] if device.type == "cuda" else ["eager"])
    )
    runs = []
    for mode in modes:  # every eager run first: compilation is what a time budget cuts
        for cfg in configs:
            if cfg not in CONFIGS:
                raise SystemExit(f"attnkit bench vit: unknown config {cfg!r}; choose from {sorted(CONFIGS)}")
            for exp in args.experiments.split(","):
                if exp not in EXPERIMENTS:
                    raise SystemExit(
                        f"attnkit bench vit: unknown experiment {exp!r}; choose from {sorted(EXPERIMENTS)}"
                    )
                if exp != "dense" and cfg not in extra_on:
                    continue
                for impl in EXPERIMENTS[exp]:
                    if only is not None and impl not in only:
                        continue
                    if mode == "compiled" and compiled_only is not None and impl not in compiled_only:
                        continue
                    runs.append((cfg, exp, impl, mode))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = _report.environment()
    runs = plan(args, device)
    if device.type == "cpu":
        print(
            "attnkit bench vit: no GPU here; running the 'tiny' configuration on the CPU "
            "(for checking the pipeline, not for timings)."
        )
    models: dict[str, tuple] = {}
    rows: list[dict] = []
    t_start = time.perf_counter()
    for cfg_name, exp, impl, mode in _report.progress(runs, "bench vit"):
        cfg = CONFIGS[cfg_name]
        seq = (cfg["img_size"] // cfg["patch_size"]) ** 2 + 1
        row = dict(
            config=cfg_name,
            experiment=exp,
            impl=impl,
            mode=mode,
            seq=seq,
            batch=cfg["batch"],
            heads=cfg["num_heads"],
            head_dim=cfg["head_dim"],
            depth=cfg["depth"],
            median_ms=None,
            note=None,
        )
        why = _why_unavailable(impl, device)
        if why is None and args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
            why = f"skipped: time budget of {args.time_budget:.0f} s spent"
        if why is not None:
            row["note"] = why
            rows.append(row)
            continue
        try:
            if cfg_name not in models:
                models.clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                models[cfg_name] = build_model(cfg, device)
            model, source = models[cfg_name]
            row["model"] = source
            fn, options, ctx = _variant(impl, exp, model, args, device, seq)
            _set_attention(model, fn, options)
            row.update(_time_steps(model, cfg, device, mode, args.compile_how, args.steps, args.warmup, ctx))
        except attnkit.UnsupportedError as e:
            row["note"] = "unsupported: " + "; ".join(e.reasons)[:160]
        except Exception as e:  # record and go on: one broken implementation must not hide the others
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        rows.append(row)
        _report.write(rows, env, args.out, "vit")  # keep what we have, even if a later run dies
    _annotate(rows)
    print(
        f"\nattnkit bench vit on {env.get('gpu') or env.get('cpu')} (torch {env['torch']}, "
        f"attnkit {env['attnkit']}, {env['date']})"
    )
    print(
        _report.table(
            rows,
            [
                ("config", "config"),
                ("experiment", "experiment"),
                ("mode", "mode"),
                ("impl", "attention"),
                ("median_ms", "ms/step"),
                ("vs_best", "x best"),
                ("peak_mem_gib", "GiB"),
                ("note", "note"),
            ],
        )
    )
    csv_path, json_path = _report.write(rows, env, args.out, "vit")
    print(f"\nwrote {csv_path} and {json_path}")
    if not args.no_plot:
        png = _plot(rows, env, args.out)
        print(f"wrote {png}" if png else "matplotlib not installed: no plot")
    return 0


def _annotate(rows):
    """``vs_best``: step time over the fastest non-attnkit implementation of one config/experiment/mode."""
    groups: dict = {}
    for r in rows:
        if r.get("median_ms") is not None and not r["impl"].startswith("attnkit"):
            key = (r["config"], r["experiment"], r["mode"])
            groups[key] = min(groups.get(key, float("inf")), r["median_ms"])
    for r in rows:
        best = groups.get((r["config"], r["experiment"], r["mode"]))
        if r.get("median_ms") is not None and best:
            r["vs_best"] = r["median_ms"] / best


def _plot(rows, env, out_dir) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import os

    panels = sorted({(r["config"], r["experiment"]) for r in rows if r.get("median_ms") is not None})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (cfg, exp) in zip(axes[0], panels):
        sub = [r for r in rows if r["config"] == cfg and r["experiment"] == exp]
        impls = list(dict.fromkeys(r["impl"] for r in sub))
        modes = list(dict.fromkeys(r["mode"] for r in sub))
        width = 0.8 / max(len(modes), 1)
        for i, mode in enumerate(modes):
            vals = [
                next((r["median_ms"] for r in sub if r["impl"] == im and r["mode"] == mode), None) or 0
                for im in impls
            ]
            ax.bar([j + i * width for j in range(len(impls))], vals, width, label=mode)
        ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(impls))])
        ax.set_xticklabels(impls, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{cfg} / {exp}")
        ax.set_ylabel("ms per training step (median)")
        ax.legend(fontsize=8)
    fig.suptitle(f"ViT training step, bf16 autocast, SGD - {env.get('gpu') or 'CPU'}, torch {env['torch']}")
    fig.tight_layout()
    path = os.path.join(out_dir, "vit.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
