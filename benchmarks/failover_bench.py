"""What each kind of process death costs the streams in flight: the pause and the throughput dip.

For each case, serves the embedded model with `raymix serve` (its own embedded Ray), runs 8
concurrent greedy streams (120 tokens each, ignore_eos) undisturbed, then again with one process
SIGKILLed 0.5 s after they start, and reports per case: streams failed, streams identical to the
undisturbed run, the longest pause between two chunks of any stream (undisturbed vs disturbed),
and output tok/s over the run (the dip). The processes are found by their Ray Serve replica
names (`ServeReplica:raymix:ExpertShard1`, `...:Router1`).

    shard          --expert-shards 2: a shard, whose experts nobody else holds (the step waits)
    shard-replicas --expert-shards 3 --expert-replicas 2: a shard whose experts all have another holder
    router-of-2    --routers 2 --expert-shards 2: router 1 (its streams resume on router 0)
    only-router    --expert-shards 2: the one router (its streams wait for Serve's replacement)

    .venv/bin/python benchmarks/failover_bench.py [--cases shard shard-replicas router-of-2 only-router]

Writes benchmarks/results/failover_bench.json and a PNG (longest pause per case).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from peer_bench import serve, stop, wait_ready  # benchmarks/peer_bench.py
from report import save  # benchmarks/report.py

ROOT = Path(__file__).resolve().parent.parent
CASES: dict[str, tuple[list[str], str]] = {  # serve flags, the replica to kill
    "shard": (["--expert-shards", "2"], "ExpertShard1"),
    "shard-replicas": (["--expert-shards", "3", "--expert-replicas", "2"], "ExpertShard1"),
    "router-of-2": (["--routers", "2", "--expert-shards", "2"], "Router1"),
    "only-router": (["--expert-shards", "2"], "Router"),
}
STREAMS, TOKENS = 8, 120


def stream(url: str, i: int) -> dict[str, Any]:
    """One greedy streamed chat → its text, finish reason (or error) and chunk times."""
    body = {
        "messages": [{"role": "user", "content": f"Story number {i}: tell me about expert {i}."}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text, finish, times = "", None, []
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"text": text, "finish": "error", "times": times}
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                    text += chunk["choices"][0]["delta"].get("content") or ""
                    finish = chunk["choices"][0]["finish_reason"] or finish
    except httpx.HTTPError:
        finish = "error"
    return {"text": text, "finish": finish or "cut", "times": times}


def replica_pid(name: str) -> int:
    """The process of the Ray Serve replica of deployment `name` in app raymix."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:raymix:{name} " in cmd + " " or cmd.endswith(f"ServeReplica:raymix:{name}"):
            return p.pid
    raise RuntimeError(f"no process for replica {name}")


def run(url: str, kill: str | None) -> dict[str, Any]:
    """STREAMS streams at once; with `kill`, that replica SIGKILLed 0.5 s in."""
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(stream, url, i) for i in range(STREAMS)]
        if kill is not None:
            pid = replica_pid(kill)
            threading.Event().wait(0.5)
            os.kill(pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    wall = time.perf_counter() - start
    pauses = [
        max((b - a for a, b in zip(r["times"], r["times"][1:], strict=False)), default=0.0) for r in results
    ]
    return {
        "results": results,
        "wall_s": wall,
        "longest_pause_s": max(pauses),
        "tok_s": STREAMS * TOKENS / wall,
        "failed": sum(r["finish"] != "length" for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--port", type=int, default=8124)
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for case in args.cases:
        flags, target = CASES[case]
        cmd = [sys.executable, "-m", "launch.cli", "serve", "--port", str(args.port), *flags]
        proc = serve(cmd, {**os.environ, "PYTHONPATH": str(ROOT)}, out / f"failover_bench_{case}.log")
        try:
            wait_ready(url, proc, 300)
            run(url, None)  # warm-up (and, with replicas, time for them to be placed)
            time.sleep(5)
            calm = run(url, None)
            hit = run(url, target)
        finally:
            stop(proc)
        same = sum(a["text"] == b["text"] for a, b in zip(calm["results"], hit["results"], strict=True))
        rows[case] = {
            "killed": target,
            "failed": hit["failed"],
            "identical": same,
            "pause_s": (round(calm["longest_pause_s"], 3), round(hit["longest_pause_s"], 3)),
            "tok_s": (round(calm["tok_s"], 1), round(hit["tok_s"], 1)),
        }
        r = rows[case]
        print(
            f"{case:>15}: {target} killed; {r['failed']}/{STREAMS} failed, {r['identical']}/{STREAMS} identical; "
            f"longest pause {r['pause_s'][0]:.2f} -> {r['pause_s'][1]:.2f} s; tok/s {r['tok_s'][0]} -> {r['tok_s'][1]}",
            flush=True,
        )
    save(
        "failover_bench",
        {"streams": STREAMS, "tokens": TOKENS, "rows": rows},
        {
            "longest pause undisturbed (s)": {i: rows[c]["pause_s"][0] for i, c in enumerate(rows)},
            "longest pause with the kill (s)": {i: rows[c]["pause_s"][1] for i, c in enumerate(rows)},
        },
        xlabel="case: " + ", ".join(f"{i} {c}" for i, c in enumerate(rows)),
        ylabel="seconds",
        title="the longest pause of 8 streams when one process dies",
    )


if __name__ == "__main__":
    main()
