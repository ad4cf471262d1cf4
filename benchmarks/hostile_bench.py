"""Hostile requests beside a normal stream: what one client's request costs the others.

Serves the embedded model with `raymix serve --expert-shards 0` (or --tree DIR: another
checkout's code, for a before/after in one run), then for each hostile request measures a normal
streamed chat request (64 tokens) alone and beside it, in one run: its wall time, the ratio,
and the stream's longest pause between chunks; and the hostile request's own status and time.
  - schema: a JSON schema whose shortest answer is 3000 tokens, n=8, max_tokens 3100
  - schema250: the same at 250 tokens (max_tokens 300), about the longest now taken
  - n8: the control, an ordinary request as large (n=8, 300 tokens, no format): what a batch
    that size costs the stream on this machine, hostile or not
  - prompts: /v1/completions with 200,000 prompts and n=16
  - big: four 3.5 MB prompts to /tokenize while the stream runs
The targets (issue 32): the normal request within 3x (or +2 s) of its time alone, and its
longest pause under 1 s. Writes benchmarks/results/hostile_bench[_TAG].json and a PNG.

    .venv/bin/python benchmarks/hostile_bench.py
    .venv/bin/python benchmarks/hostile_bench.py --tree /tmp/before --tag before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from peer_bench import serve, stop, wait_ready  # benchmarks/peer_bench.py
from report import save  # benchmarks/report.py

ROOT = Path(__file__).resolve().parent.parent
NORMAL = {"messages": [{"role": "user", "content": "Tell me about experts."}], "max_tokens": 64}


def normal_stream(url: str) -> tuple[float, float]:
    """A normal streamed chat request → (seconds in all, longest pause between chunks)."""
    body = {**NORMAL, "stream": True, "ignore_eos": True, "temperature": 0.0}
    start = last = time.perf_counter()
    pause = 0.0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                now = time.perf_counter()
                pause, last = max(pause, now - last), now
    return time.perf_counter() - start, pause


def hostile(kind: str, url: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of the hostile request(s) of this kind."""
    if kind in ("schema", "schema250"):  # the review's; the longest shortest answer taken now
        length, budget = (3000, 3100) if kind == "schema" else (250, 300)
        schema = {"type": "string", "pattern": f"^[~!]{{{length}}}$"}
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        body = {**NORMAL, "response_format": fmt, "n": 8, "max_tokens": budget}
        return [("/v1/chat/completions", body)]
    if kind == "n8":  # not hostile: the control, a plain request as large as schema250's
        return [("/v1/chat/completions", {**NORMAL, "n": 8, "max_tokens": 300, "ignore_eos": True})]
    if kind == "prompts":
        return [("/v1/completions", {"prompt": ["a"] * 200_000, "n": 16, "max_tokens": 1})]
    if kind == "big":
        text = "expert " * 500_000  # 3.5 MB
        return [("/tokenize", {"prompt": text})] * 4
    raise ValueError(kind)


def beside(kind: str, url: str) -> dict[str, Any]:
    """The normal stream alone, then beside the hostile request(s) (started 0.3 s before)."""
    alone = [normal_stream(url) for _ in range(3)]
    results: list[tuple[int | str, float]] = []

    def send(path: str, body: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            code: int | str = httpx.post(f"{url}{path}", json=body, timeout=300).status_code
        except httpx.HTTPError as e:
            code = type(e).__name__
        results.append((code, time.perf_counter() - start))

    threads = [threading.Thread(target=send, args=pair) for pair in hostile(kind, url)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    seconds, pause = normal_stream(url)
    for t in threads:
        t.join(330)
    base = statistics.median(s for s, _ in alone)
    return {
        "alone_s": round(base, 3),
        "alone_pause_s": round(statistics.median(p for _, p in alone), 3),
        "beside_s": round(seconds, 3),
        "beside_pause_s": round(pause, 3),
        "ratio": round(seconds / base, 2),
        "within_target": seconds <= max(3 * base, base + 2) and pause < 1.0,
        "hostile": [{"status": code, "seconds": round(t, 2)} for code, t in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(ROOT), help="the checkout whose code serves (default: this one)")
    ap.add_argument("--tag", default="", help="results file hostile_bench_TAG")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--kinds", nargs="+", default=["schema", "schema250", "prompts", "big"])
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PYTHONPATH": args.tree}
    cmd = [sys.executable, "-m", "launch.cli", "serve", "--expert-shards", "0", "--port", str(args.port)]
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    proc = serve(cmd, env, out / f"hostile_bench_server{'_' + args.tag if args.tag else ''}.log")
    try:
        wait_ready(url, proc, 300)
        normal_stream(url)  # warm-up
        rows = {}
        for kind in args.kinds:
            rows[kind] = beside(kind, url)
            r = rows[kind]
            print(
                f"{kind:>8}: normal {r['alone_s']:.2f}s alone, {r['beside_s']:.2f}s beside ({r['ratio']}x), "
                f"longest pause {r['alone_pause_s']:.2f}s -> {r['beside_pause_s']:.2f}s; "
                f"hostile {r['hostile']}",
                flush=True,
            )
    finally:
        stop(proc)
    name = f"hostile_bench{'_' + args.tag if args.tag else ''}"
    series = {
        "normal request, alone (s)": {i: rows[k]["alone_s"] for i, k in enumerate(rows)},
        "beside the hostile one (s)": {i: rows[k]["beside_s"] for i, k in enumerate(rows)},
        "longest pause beside (s)": {i: rows[k]["beside_pause_s"] for i, k in enumerate(rows)},
    }
    save(
        name,
        {"tree": args.tree, "kinds": list(rows), "rows": rows},
        series,
        xlabel=" / ".join(f"{i}: {k}" for i, k in enumerate(rows)),
        ylabel="seconds",
        title="A normal stream beside hostile requests",
    )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
