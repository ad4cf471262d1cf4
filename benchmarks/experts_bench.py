"""One MoE layer's experts: grouped GEMMs (moe.layers.experts.LocalExperts.forward) against the
per-expert loop it replaced, on this device, per token count.

The loop takes each expert's tokens with a `nonzero()` (a host sync per expert) and runs two
matmuls per expert; the grouped path sorts the assignments by expert and runs one grouped GEMM
per projection. Median of --runs timings of --iters calls each, both paths alternating in one
process; written to JSON and PNG.

    .venv/bin/python benchmarks/experts_bench.py [--hidden 512 --intermediate 1024] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from report import save  # benchmarks/report.py

from moe.config import ModelConfig
from moe.layers.experts import LocalExperts, select_experts


def loop_forward(ex: LocalExperts, layer: int, x, expert_ids, weights):
    """The per-expert loop (as tests/test_experts.py keeps it)."""
    out = torch.zeros_like(x)
    local = ex.expert_map[expert_ids.clamp(min=0)].masked_fill(expert_ids < 0, -1)
    inter = ex.cfg.expert_intermediate_size
    for j in range(len(ex.expert_ids)):
        rows, slot = (local == j).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        gu = x[rows] @ ex.gate_up[layer][j].t()
        y = (F.silu(gu[:, :inter]) * gu[:, inter:]) @ ex.down[layer][j].t()
        out.index_add_(0, rows, (y * weights[rows, slot, None]).to(x.dtype))
    return out


def timed(f, iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        f()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    h, i, e = args.hidden, args.intermediate, args.experts
    cfg = ModelConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=1, num_local_experts=e)
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(device, dtype)
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(device, dtype)
    ex = LocalExperts(cfg, list(range(e)), [gate_up], [down])
    print(
        f"{device} {dtype}, hidden {h}, intermediate {i}, {e} experts, top-2, {torch.get_num_threads()} threads"
    )
    results: dict[str, dict[int, float]] = {"grouped GEMM": {}, "per-expert loop": {}}
    for t in args.tokens:
        x = torch.randn(t, h, generator=g).to(device, dtype)
        w, ids = select_experts(torch.randn(t, e, generator=g).to(device), 2)
        paths = {
            "grouped GEMM": lambda x=x, ids=ids, w=w: ex.forward(0, x, ids, w),
            "per-expert loop": lambda x=x, ids=ids, w=w: loop_forward(ex, 0, x, ids, w),
        }
        runs: dict[str, list[float]] = {k: [] for k in paths}
        for f in paths.values():
            f()  # warm-up
        for _ in range(args.runs):
            for name, f in paths.items():
                runs[name].append(timed(f, args.iters, device))
        for name in paths:
            results[name][t] = statistics.median(runs[name])
        ratio = results["per-expert loop"][t] / results["grouped GEMM"][t]
        print(
            f"{t:>5} tokens: grouped {results['grouped GEMM'][t]:.3f} ms, "
            f"loop {results['per-expert loop'][t]:.3f} ms, grouped is {ratio:.2f}x the loop's speed",
            flush=True,
        )
    save(
        f"experts_bench_{device.type}",
        {"device": str(device), "dtype": args.dtype, "hidden": h, "intermediate": i, "ms": results},
        results,
        xscale="log",
        xlabel="tokens",
        ylabel="ms per MoE layer",
        title=f"Experts of one layer on {device.type} ({args.dtype})",
    )


if __name__ == "__main__":
    main()
