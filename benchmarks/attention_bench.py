"""One layer's decode attention against its bandwidth limit: the dense gather vs FlexAttention.

A decode step's attention must read each sequence's cached K and V once: B·ctx·Hkv·D·2
elements. That many bytes over the device's measured copy bandwidth is the fastest it can be.
Two ways of doing it, both as the decode CUDA graph runs them (moe.engine.decode_path), timed per layer:
- `sdpa` (moe.layers.attention.DenseDecode, the reference): each context's slots gathered into a
  dense [B, L] tensor (L the context padded to a power of two), then one SDPA call;
- `flex` (moe.layers.flex_decode): FlexAttention compiled, reading the pages in place through a
  block mask made of the block tables.
On CUDA each is captured in a CUDA graph and replayed (as the engine does: launch costs out);
on CPU it is called directly. Attention shape of Mixtral (32 query / 8 KV heads, head dim 128),
contexts of --contexts tokens in --block-size blocks spread over the cache. Median of --runs;
printed, JSON + PNG (fraction of the limit against the context, one line per backend and B).

    .venv/bin/python benchmarks/attention_bench.py                     # GPU: bf16
    .venv/bin/python benchmarks/attention_bench.py --device cpu --dtype float32 --streams 1 8 --contexts 256 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpu_bench import copy_bandwidth, sync  # benchmarks/gpu_bench.py
from report import save  # benchmarks/report.py

from moe.config import ModelConfig
from moe.engine.decode_path import context_buckets, smallest_fit
from moe.engine.kv_cache import KVCache
from moe.layers.attention import DenseDecode
from moe.layers.flex_decode import FlexDecode


def layer_seconds(run, device: torch.device, iters: int) -> float:
    """Seconds per call of run() (on CUDA: of a replay of its captured graph)."""
    for _ in range(3):
        run()  # warm-up (and compile)
    sync(device)
    call = run
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        call = graph.replay
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        call()
    sync(device)
    return (time.perf_counter() - t) / iters


def measure(cfg: ModelConfig, b: int, ctx: int, args: argparse.Namespace, bw: float) -> dict[str, dict]:
    """Both backends on b sequences of ctx tokens, their blocks spread over the cache →
    {backend: {"us": per layer, "fraction": of the limit}} (a backend that fails: its error)."""
    device, dtype, bs = torch.device(args.device), getattr(torch, args.dtype), args.block_size
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
    pages = -(-ctx // bs)
    blocks = max(args.cache_blocks, b * pages + 8)  # the batch's pages spread over the whole cache
    cache = KVCache(cfg, blocks, bs, dtype, device)
    cache.k.normal_()
    cache.v.normal_()
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(b)).tolist()
    tables = [order[i * pages : (i + 1) * pages] for i in range(b)]
    q = torch.randn(b, hq, d, dtype=dtype, device=device)  # [B, Hq, D]
    k = torch.randn(b, hkv, d, dtype=dtype, device=device)  # [B, Hkv, D]
    positions = torch.full((b,), ctx - 1, device=device)
    slots = torch.tensor([t[(ctx - 1) // bs] * bs + (ctx - 1) % bs for t in tables], device=device)
    limit = b * ctx * hkv * d * 2 * torch.tensor([], dtype=dtype).element_size() / bw  # K and V once
    bucket = smallest_fit(context_buckets(ctx), ctx)
    out: dict[str, dict] = {}
    for name, attention in (
        ("sdpa", DenseDecode(cache, b, bucket, None)),
        ("flex", FlexDecode(cache, b, None, compile=True)),
    ):
        attention.fill(tables, [ctx] * b, b, bucket)
        meta = attention.metadata(positions, slots, b, bucket)  # once per step: not timed

        def run(meta=meta) -> None:
            meta.attend(q, k, k, cache.k[0], cache.v[0])

        try:
            secs = statistics.median(layer_seconds(run, device, args.iters) for _ in range(args.runs))
        except Exception as e:  # e.g. inductor's CPU kernel failing to build for a shape
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"  B={b:>3} ctx={ctx:>5} {name}: failed ({out[name]['error']})", flush=True)
            continue
        out[name] = {"us": secs * 1e6, "fraction": limit / secs}
        print(
            f"  B={b:>3} ctx={ctx:>5} {name}: {secs * 1e6:9.1f} us per layer ({limit / secs:.2f} of the limit)"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--cache-blocks",
        type=int,
        default=0,
        help="KV cache blocks (an engine-sized cache, as the engine's kernel sees it); default: the batch's pages",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    # Mixtral's attention: 32 query heads, 8 KV heads, of --head-dim
    cfg = ModelConfig(num_hidden_layers=1, hidden_size=32 * args.head_dim, head_dim=args.head_dim)
    bw = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**28)
    print(f"{args.dtype} on {device}; copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    table = {(b, c): measure(cfg, b, c, args, bw) for b in args.streams for c in args.contexts}
    print(f"\nper layer, median of {args.runs}: microseconds (fraction of the bandwidth limit)")
    print(f"{'streams':>8} {'context':>8} {'sdpa':>18} {'flex':>18} {'sdpa/flex':>10}")
    for (b, c), r in table.items():
        cells = [
            f"{r[n]['us']:>10.1f} ({r[n]['fraction']:.2f})" if "us" in r[n] else f"{'failed':>18}" for n in r
        ]
        speedup = f"{r['sdpa']['us'] / r['flex']['us']:.2f}x" if all("us" in r[n] for n in r) else "-"
        print(f"{b:>8} {c:>8} {cells[0]:>18} {cells[1]:>18} {speedup:>10}")
    series = {
        f"{n}, B={b}": {c: table[b, c][n]["fraction"] for c in args.contexts if "us" in table[b, c][n]}
        for n in ("sdpa", "flex")
        for b in args.streams
    }
    save(
        f"attention_bench_{device.type}",
        {
            "device": str(device),
            "dtype": args.dtype,
            "copy_bandwidth_bytes_per_s": bw,
            "rows": [{"streams": b, "context": c, **r} for (b, c), r in table.items()],
        },
        series,
        xscale="log",
        xlabel="context tokens",
        ylabel="fraction of the bandwidth limit",
        title=f"Decode attention per layer ({device.type}, {args.dtype})",
    )


if __name__ == "__main__":
    main()
