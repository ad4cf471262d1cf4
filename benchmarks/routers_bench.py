"""Several routers: 1 vs 2 routers sharing the same expert shards, served over HTTP, in one run;
and the step model's per-GPU throughput against M:N for Mixtral 8x7B on 8 and 16 GPUs.

Each configuration is started here (embedded Ray), driven with serve_bench's load (streaming
chat, mixed prompt lengths, median of --runs passes per level), then stopped. Prints tok/s per
level and the 2-vs-1 ratio, and writes JSON and a PNG (measured ratios beside the model's curve).

    .venv/bin/python benchmarks/routers_bench.py                        # 1 vs 2 routers, 2 shards, 32/64 streams
    .venv/bin/python benchmarks/routers_bench.py --routers 1 2 4 --expert-shards 4

On a CPU box the routers and shards share its cores: a second router adds a process that
computes attention at the same time as the first, not hardware; the cores are printed with the
figures. On a GPU cluster each router is its own GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from serve_bench import server_level  # benchmarks/serve_bench.py

OUT = Path(__file__).parent / "results"


def model_curve(gpus: int) -> list[dict[str, Any]]:
    from cluster.capacity import MIXTRAL_8X7B, best_split

    return [
        {"routers": s.routers, "shards": s.shards, "tok_s_per_gpu": s.tok_s_per_gpu, "tok_s": s.tok_s}
        for s in sorted(best_split(MIXTRAL_8X7B, gpus), key=lambda s: s.routers)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--expert-shards", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: 2 x concurrency")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from cluster.config import RaymixSettings
    from launch import bringup

    machine = {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    report: dict[str, Any] = {"machine": machine, "expert_shards": args.expert_shards, "served": {}}
    print(f"machine: {machine}; {args.expert_shards} expert shards", flush=True)
    for m in args.routers:
        s = RaymixSettings(
            routers=m,
            expert_shards=args.expert_shards,
            max_num_seqs=max(args.concurrency),
            max_model_len=1024,
        )
        print(f"starting raymix: {m} router(s) x {args.expert_shards} shards ...", flush=True)
        url = bringup.start(s)
        model = s.model_names()[0]
        report["served"][m] = {
            c: server_level(url, model, c, args, m == 1, f"{m} router(s)") for c in args.concurrency
        }
        bringup.shutdown(routers=m)
    for gpus in (8, 16):
        report[f"model_{gpus}_gpus"] = model_curve(gpus)

    print(f"\nserved output tok/s ({machine['cores']} cores, {args.expert_shards} expert shards):")
    print(
        f"{'streams':>8} " + " ".join(f"{f'{m} router(s)':>12}" for m in args.routers) + "   ratio to first"
    )
    for c in args.concurrency:
        row = [report["served"][m][c]["output_tok_s"] for m in args.routers]
        ratios = " ".join(f"{r / row[0]:.2f}" for r in row[1:])
        print(f"{c:>8} " + " ".join(f"{r:>12.1f}" for r in row) + f"   {ratios}")
    for gpus in (8, 16):
        curve = report[f"model_{gpus}_gpus"]
        best = max(curve, key=lambda r: r["tok_s_per_gpu"])
        print(
            f"model, Mixtral 8x7B on {gpus} GPUs: "
            + ", ".join(f"{r['routers']}:{r['shards']} {r['tok_s_per_gpu']:.0f}" for r in curve)
            + f" tok/s per GPU; best {best['routers']}:{best['shards']}"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "routers_bench.json").write_text(json.dumps(report, indent=2))
    plot(report, args)


def plot(report: dict[str, Any], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m in args.routers:
        a.plot(
            args.concurrency,
            [report["served"][m][c]["output_tok_s"] for c in args.concurrency],
            marker="o",
            label=f"{m} router(s)",
        )
    a.set_xlabel("concurrent streams")
    a.set_ylabel("output tok/s")
    a.set_title(f"served on {report['machine']['cores']} CPU cores, {args.expert_shards} shards")
    a.legend()
    for gpus in (8, 16):
        curve = report[f"model_{gpus}_gpus"]
        b.plot(
            [f"{r['routers']}:{r['shards']}" for r in curve],
            [r["tok_s_per_gpu"] for r in curve],
            marker="s",
            label=f"{gpus} GPUs",
        )
    b.set_xlabel("routers : expert shards")
    b.set_ylabel("decode tok/s per GPU (model)")
    b.set_title("Mixtral 8x7B, step model (cluster.capacity)")
    b.legend()
    fig.tight_layout()
    fig.savefig(OUT / "routers_bench.png", dpi=100)
    print(f"wrote {OUT / 'routers_bench.json'} and {OUT / 'routers_bench.png'}")


if __name__ == "__main__":
    main()
