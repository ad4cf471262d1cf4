"""Serving benchmark: a raymix server over HTTP against in-process baselines, in one run.

Drives the server with the async openai client (streaming chat completions) at each concurrency
level on prompts of mixed lengths, and reports output tok/s, requests/s, TTFT, ITL (gaps between
streamed chunks), TPOT ((e2e - TTFT) / (tokens - 1)) and e2e latency as p50/p90/p99, from the
pass of median throughput out of --runs (3) passes per level (every pass's tok/s is kept). In the same
run, on the same checkpoint, it measures the baselines: the in-process engine (all experts
local) at the same concurrency, and transformers `generate` one request at a time and as a
static batch. Per level it also prints the router's own step profile (wall time per engine step,
the part spent on the experts, tokens per step). Then it restarts the server with two-micro-batch
overlap flipped and runs --compare-overlap levels again, so overlap on vs off is one run's ratio.
Writes JSON and a PNG (throughput and ITL vs concurrency).

    .venv/bin/python benchmarks/serve_bench.py                     # starts its own local server
    .venv/bin/python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --model-name NAME
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).parent / "results"
WORDS = [
    "the",
    "experts",
    "of",
    "a",
    "mixture",
    "each",
    "see",
    "only",
    "the",
    "tokens",
    "their",
    "router",
    "sends",
    "them",
    "while",
    "attention",
    "sees",
    "all",
]


def prompt_text(i: int) -> str:
    n = 3 + (i * 7) % 40  # mixed lengths: 3..42 words
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


async def one_request(client, model: str, i: int, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt_text(i)}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (stamps[0] if stamps else end) - start
    return {
        "ttft": ttft,
        "e2e": end - start,
        "tokens": tokens,
        "itl": [b - a for a, b in itertools.pairwise(stamps)],
        "tpot": (end - start - ttft) / max(1, tokens - 1),
    }


async def http_level(
    url: str, model: str, concurrency: int, requests: int, max_tokens: int
) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key=os.environ.get("RAYMIX_API_KEY", "none"), max_retries=0, timeout=600
    )
    sem = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> dict[str, Any]:
        async with sem:
            return await one_request(client, model, i, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(i) for i in range(requests)))
    wall = time.perf_counter() - start
    await client.close()
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    summary = {"output_tok_s": tokens / wall, "req_s": len(results) / wall}
    for key, xs in (
        ("ttft", [r["ttft"] for r in results]),
        ("itl", itl),
        ("tpot", [r["tpot"] for r in results]),
        ("e2e", [r["e2e"] for r in results]),
    ):
        summary |= {
            f"{key}_p50_ms": pct(xs, 50) * 1e3,
            f"{key}_p90_ms": pct(xs, 90) * 1e3,
            f"{key}_p99_ms": pct(xs, 99) * 1e3,
        }
    return summary


def engine_level(eng, concurrency: int, requests: int, max_tokens: int) -> float:
    from moe.sampling import SamplingParams

    prompts = [
        eng.tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(i)}])
        for i in range(requests)
    ]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    tokens = 0
    for k in range(0, requests, concurrency):  # waves of `concurrency` sequences
        tokens += sum(s.num_output_tokens for s in eng.generate(prompts[k : k + concurrency], params))
    return tokens / (time.perf_counter() - start)


def prefill_ms(eng, requests: int) -> float:
    """Median time to the first token in-process, over the prompts the server got at 1 stream."""
    from moe.sampling import SamplingParams

    times = []
    for i in range(requests):
        p = eng.tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(i)}])
        for _ in range(3):
            t = time.perf_counter()
            eng.generate([p], SamplingParams(max_tokens=1, temperature=0.0))
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def router_stats() -> Any:
    """The router's RouterStats (when the server was started here), or None."""
    from ray import serve

    from cluster.messages import APP_NAME

    try:
        return serve.get_deployment_handle("Router", app_name=APP_NAME).stats.remote().result()
    except Exception:
        return None


def step_profile(before: Any, after: Any, tokens: int) -> dict[str, float]:
    """Per engine step over one level: its wall time, the part spent on the experts (dispatch,
    waiting for the shards, combine), and the output tokens it made."""
    if not before or not after or after.steps == before.steps:
        return {}
    steps = after.steps - before.steps
    step_s = after.step_seconds - before.step_seconds
    experts_s = after.expert_seconds - before.expert_seconds
    return {
        "steps": steps,
        "step_ms": step_s / steps * 1e3,
        "experts_ms_per_step": experts_s / steps * 1e3,
        "dense_ms_per_step": (step_s - experts_s) / steps * 1e3,
        "tokens_per_step": tokens / steps,
    }


def hf_tok_s(hf, tok, batch: int, max_tokens: int) -> float:
    prompts = [tok.apply_chat_template([{"role": "user", "content": prompt_text(i)}]) for i in range(batch)]
    width = max(map(len, prompts))
    pad = tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return batch * max_tokens / (time.perf_counter() - t)


def server_level(url: str, model: str, c: int, args: Any, started_here: bool, label: str) -> dict[str, Any]:
    """One concurrency level over HTTP (after a short warm-up), with the router's step profile:
    --runs passes, reported by the pass of median throughput (all passes' tok/s kept)."""
    n = args.requests_per_level or max(4, 2 * c)
    asyncio.run(http_level(url, model, min(c, 2), 2, 4))  # warm-up
    passes = []
    for _ in range(args.runs):
        before = router_stats() if started_here else None
        r = asyncio.run(http_level(url, model, c, n, args.max_tokens))
        r["router"] = step_profile(before, router_stats() if started_here else None, n * args.max_tokens)
        passes.append(r)
    passes.sort(key=lambda p: p["output_tok_s"])
    r = passes[len(passes) // 2]
    r["runs_output_tok_s"] = [p["output_tok_s"] for p in passes]
    prof = r["router"]
    print(
        f"  server x{c:<3} ({label}) {r['output_tok_s']:7.1f} tok/s "
        f"(runs {' '.join(f'{t:.0f}' for t in r['runs_output_tok_s'])})  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
        f"ITL p50 {r['itl_p50_ms']:6.1f} ms  e2e p50 {r['e2e_p50_ms']:7.0f} ms"
        + (
            f"  | router step {prof['step_ms']:.1f} ms (experts {prof['experts_ms_per_step']:.1f}, "
            f"dense {prof['dense_ms_per_step']:.1f}), {prof['tokens_per_step']:.1f} tokens/step"
            if prof
            else ""
        ),
        flush=True,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server; default: start one here")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--model-name", default=None)
    ap.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--expert-shards", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: 2 x concurrency (at least 4)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="passes per level; the median is reported")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument(
        "--compare-overlap",
        type=int,
        nargs="*",
        default=[1, 32],
        help="after the main levels, restart the server with two-micro-batch overlap flipped and "
        "run these levels again (none: skip)",
    )
    args = ap.parse_args()

    from cluster.config import RaymixSettings
    from moe.engine.llm_engine import EngineConfig, LLMEngine

    settings = RaymixSettings(
        model=args.model,
        expert_shards=args.expert_shards,
        max_num_seqs=max(args.concurrency),
        max_model_len=1024,
        overlap=args.overlap,
    )
    model_dir = settings.model_dir()
    started_here = args.url is None
    if started_here:
        from launch import bringup

        print(f"starting raymix: {args.expert_shards} expert shards ...", flush=True)
        url = bringup.start(settings)
    else:
        url = args.url
    model = args.model_name or settings.model_names()[0]
    machine = {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "expert_shards": args.expert_shards,
        "max_tokens": args.max_tokens,
        "model": str(model_dir),
    }
    overlap = settings.overlap or False  # unset: on only with GPUs
    machine["overlap"] = overlap
    print(f"machine: {machine}", flush=True)
    report: dict[str, Any] = {"machine": machine, "server": {}, "engine": {}, "transformers": {}}
    label = f"overlap {'on' if overlap else 'off'}"
    for c in args.concurrency:
        report["server"][c] = server_level(url, model, c, args, started_here, label)
    if started_here:
        from launch import bringup

        bringup.shutdown()
        if args.compare_overlap:
            flipped = settings.model_copy(update={"overlap": not overlap})
            label = f"overlap {'off' if overlap else 'on'}"
            print(f"restarting with {label} ...", flush=True)
            url = bringup.start(flipped)
            report["server_overlap_flipped"] = {
                c: server_level(url, model, c, args, True, label) for c in args.compare_overlap
            }
            bringup.shutdown()
    if not args.skip_baselines:
        from transformers import MixtralForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        eng = LLMEngine.from_pretrained(
            model_dir, EngineConfig(max_num_seqs=max(args.concurrency), max_model_len=1024)
        )
        report["engine"]["prefill_ms"] = prefill_ms(eng, args.requests_per_level or 4)
        for c in args.concurrency:
            report["engine"][c] = statistics.median(
                engine_level(eng, c, args.requests_per_level or max(4, 2 * c), args.max_tokens)
                for _ in range(args.runs)
            )
            print(f"  in-process engine x{c:<3} {report['engine'][c]:7.1f} tok/s", flush=True)
        hf = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        for b in (1, 32):
            report["transformers"][b] = statistics.median(
                hf_tok_s(hf, eng.tokenizer, b, args.max_tokens) for _ in range(max(2, args.runs))
            )
            print(f"  transformers generate batch {b:<3} {report['transformers'][b]:7.1f} tok/s", flush=True)
    print_table(report, args.concurrency)
    flipped = report.get("server_overlap_flipped")
    if flipped:
        on, off = (flipped, report["server"]) if not overlap else (report["server"], flipped)
        print("\ntwo-micro-batch overlap, output tok/s (same run):")
        for c in flipped:
            print(
                f"  x{c:<3} on {on[c]['output_tok_s']:7.1f}  off {off[c]['output_tok_s']:7.1f}  "
                f"on/off {on[c]['output_tok_s'] / off[c]['output_tok_s']:.2f}"
            )
    OUT.mkdir(exist_ok=True)
    (OUT / "serve_bench.json").write_text(json.dumps(report, indent=2))
    plot(report, args.concurrency)


def print_table(report: dict[str, Any], levels: list[int]) -> None:
    print(
        f"\n{'conc':>5} {'server tok/s':>13} {'engine tok/s':>13} {'ratio':>6} {'req/s':>6} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'TPOT p50':>9} {'e2e p50':>8} {'e2e p99':>8}"
    )
    for c in levels:
        s, e = report["server"][c], report["engine"].get(c)
        ratio = f"{s['output_tok_s'] / e:6.2f}" if e else "     -"
        print(
            f"{c:>5} {s['output_tok_s']:>13.1f} {e or float('nan'):>13.1f} {ratio} {s['req_s']:>6.2f} "
            f"{s['ttft_p50_ms']:>9.1f} {s['ttft_p99_ms']:>9.1f} {s['itl_p50_ms']:>8.1f} {s['itl_p99_ms']:>8.1f} "
            f"{s['tpot_p50_ms']:>9.1f} {s['e2e_p50_ms']:>8.0f} {s['e2e_p99_ms']:>8.0f}"
        )
    hf = report["transformers"]
    if hf:
        top = max(levels)
        print(
            f"\ntransformers generate: {hf[1]:.1f} tok/s one at a time, {hf[32]:.1f} tok/s static batch of 32"
        )
        if 32 in report["server"]:
            s32 = report["server"][32]["output_tok_s"]
            print(
                f"server at 32 streams: {s32 / hf[1]:.2f}x transformers one at a time, {s32 / hf[32]:.2f}x its static batch"
            )
        print(
            f"in-process time to first token (the 1-stream prompts, median): {report['engine']['prefill_ms']:.1f} ms; "
            f"server TTFT p50 at 1 stream: {report['server'][levels[0]]['ttft_p50_ms']:.1f} ms"
        )
        print(
            f"server throughput from 1 to {top} streams: {report['server'][levels[0]]['output_tok_s']:.1f} -> "
            f"{report['server'][top]['output_tok_s']:.1f} tok/s"
        )


def plot(report: dict[str, Any], levels: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(
        levels,
        [report["server"][c]["output_tok_s"] for c in levels],
        marker="o",
        label="raymix server (HTTP)",
    )
    if report["engine"]:
        a.plot(levels, [report["engine"][c] for c in levels], marker="s", label="in-process engine")
    for bsz, tps in report["transformers"].items():
        a.axhline(
            tps, linestyle="--", color="grey" if bsz == 1 else "black", label=f"transformers batch {bsz}"
        )
    a.set(xscale="log", xlabel="concurrent streams", ylabel="output tok/s", title="Throughput")
    a.set_xticks(levels, [str(c) for c in levels])
    a.legend(fontsize=8)
    for q in ("p50", "p90", "p99"):
        b.plot(levels, [report["server"][c][f"itl_{q}_ms"] for c in levels], marker="o", label=f"ITL {q}")
    b.set(xscale="log", xlabel="concurrent streams", ylabel="ms", title="Inter-token latency")
    b.set_xticks(levels, [str(c) for c in levels])
    b.legend(fontsize=8)
    fig.suptitle(
        f"raymix, {report['machine']['expert_shards']} expert shards, {report['machine']['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(OUT / "serve_bench.png", dpi=100)
    print(f"wrote {OUT / 'serve_bench.json'} and {OUT / 'serve_bench.png'}")


if __name__ == "__main__":
    main()
