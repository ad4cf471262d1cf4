"""Soak: a bounded run of mixed traffic against a raymix server, then the damage report.

Valid streaming and non-streaming requests, invalid ones (bad JSON, out-of-range parameters,
unknown model, oversized context), and streams the client cancels midway, from several worker
threads, for --minutes (default 10). It prints requests by outcome — anything other than the
expected outcome of its kind is "unexpected" — and the RSS of every Ray process at the start and
at the end (growth would mean a leak). Traffic goes to 127.0.0.1 only.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--workers 6]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import threading
import time
from pathlib import Path

import httpx

OUT = Path(__file__).parent / "results"
CHAT = "/v1/chat/completions"


def ray_rss() -> dict[str, int]:
    """name (pid) → RSS KiB of every Ray process on this machine."""
    ps = subprocess.run(["ps", "-eo", "pid,rss,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    out = {}
    for line in ps:
        pid, rss, args = line.split(None, 2)
        if "ray::" in args or "raylet" in args or "gcs_server" in args:
            name = args.split()[0].replace("ray::", "")
            out[f"{name} ({pid})"] = int(rss)
    return out


def one(client: httpx.Client, kind: str, rng: random.Random) -> str:
    """Send one request of `kind`; → its outcome ('ok', '4xx', 'cancelled', or 'unexpected: ...')."""
    good = {
        "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
        "max_tokens": rng.randint(1, 24),
    }
    if kind == "valid":
        r = client.post(CHAT, json=good)
        return (
            "ok"
            if r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
            else f"unexpected: {r.status_code}"
        )
    if kind == "stream":
        with client.stream("POST", CHAT, json={**good, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        return (
            "ok" if r.status_code == 200 and lines[-1] == "data: [DONE]" else f"unexpected: {r.status_code}"
        )
    if kind == "cancelled":
        with client.stream(
            "POST", CHAT, json={**good, "max_tokens": 200, "ignore_eos": True, "stream": True}
        ) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break  # the client walks away mid-stream
        return "cancelled"
    bad = rng.choice(
        [
            b"{broken",
            json.dumps({**good, "temperature": 9}).encode(),
            json.dumps({**good, "model": "missing-model"}).encode(),
            json.dumps({**good, "max_tokens": 10**7}).encode(),
            json.dumps({"messages": [{"role": "alien", "content": "x"}]}).encode(),
        ]
    )
    r = client.post(CHAT, content=bad, headers={"Content-Type": "application/json"})
    ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
    return "4xx" if ok else f"unexpected: {r.status_code}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server; default: start one here")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--expert-shards", type=int, default=2)
    args = ap.parse_args()
    started_here = args.url is None
    if started_here:
        from cluster.config import RaymixSettings
        from launch import bringup

        url = bringup.start(RaymixSettings(expert_shards=args.expert_shards, max_model_len=1024))
    else:
        url = args.url
    time.sleep(2)
    rss_start = ray_rss()
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    end = time.monotonic() + args.minutes * 60
    kinds = ["valid"] * 4 + ["stream"] * 3 + ["invalid"] * 2 + ["cancelled"]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < end:
                kind = rng.choice(kinds)
                try:
                    outcome = one(client, kind, rng)
                except httpx.HTTPError as e:
                    outcome = f"unexpected: {type(e).__name__}"
                with lock:
                    outcomes[f"{kind}: {outcome}"] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(min(30, max(0.5, end - time.monotonic())))
        with lock:
            print(
                f"  {max(0, end - time.monotonic()):5.0f}s left: {sum(outcomes.values())} requests, "
                f"{sum(v for k, v in outcomes.items() if 'unexpected' in k)} unexpected",
                flush=True,
            )
    time.sleep(3)  # let aborted requests drain
    health = httpx.get(f"{url}/health").status_code
    rss_end = ray_rss()
    print("\nrequests by outcome:")
    for k, v in sorted(outcomes.items()):
        print(f"  {k:<28} {v}")
    unexpected = sum(v for k, v in outcomes.items() if "unexpected" in k)
    print(f"unexpected: {unexpected}; /health at the end: {health}")
    print(f"\n{'process':<52} {'RSS start MiB':>13} {'RSS end MiB':>12} {'growth':>7}")
    for name in sorted(set(rss_start) & set(rss_end)):
        a, b = rss_start[name] / 1024, rss_end[name] / 1024
        print(f"  {name:<50} {a:>13.0f} {b:>12.0f} {100 * (b - a) / a:>6.1f}%")
    total_a = sum(rss_start[n] for n in set(rss_start) & set(rss_end)) / 1024
    total_b = sum(rss_end[n] for n in set(rss_start) & set(rss_end)) / 1024
    print(
        f"  {'all Ray processes':<50} {total_a:>13.0f} {total_b:>12.0f} {100 * (total_b - total_a) / total_a:>6.1f}%"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "soak.json").write_text(
        json.dumps(
            {
                "minutes": args.minutes,
                "outcomes": outcomes,
                "unexpected": unexpected,
                "rss_start_kib": rss_start,
                "rss_end_kib": rss_end,
            },
            indent=2,
        )
    )
    if started_here:
        from launch import bringup

        bringup.shutdown()


if __name__ == "__main__":
    main()
