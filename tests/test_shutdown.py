"""`raymix serve` stopped as a container runtime or a terminal stops it: SIGTERM to its whole
process group while a stream runs. It stops taking requests, lets the stream finish (the
drain), and exits with every process it started gone, Ray's included. Its own Ray (the
embedded one `raymix serve` starts), on 127.0.0.1; one run, bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from launch.bringup import wait_healthy
from tests.cluster_harness import free_port

DRAIN_S = 20


def test_sigterm_to_the_group_drains_the_stream_and_leaves_nothing_running(tmp_path):
    port = free_port()
    raymix = Path(sys.executable).parent / "raymix"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            str(raymix),
            "serve",
            "--port",
            str(port),
            "--expert-shards",
            "1",
            "--drain-timeout-s",
            str(DRAIN_S),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a group of its own, as a container's or a terminal job's
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=240)
        started = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert len(started) >= 4  # the server, and Ray's daemons and workers under it
        events: list[tuple[float, str]] = []
        first = threading.Event()

        def stream() -> None:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "ignore_eos": True}
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append((time.monotonic(), line[6:]))
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        t0 = time.monotonic()
        os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
        reader.join(DRAIN_S + 30)
        assert not reader.is_alive()
        data = [e for _, e in events]
        assert data[-1] == "[DONE]"  # the stream ran to its end while the server drained
        assert events[-1][0] > t0  # it was still under way when SIGTERM came
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in data[:-1] if json.loads(e)["choices"]]
        assert finish[-1] == "length"
        assert proc.wait(DRAIN_S + 30) == 0
        print(f"exited {time.monotonic() - t0:.1f} s after SIGTERM (drain limit {DRAIN_S} s)")
        time.sleep(1)
        left = [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert left == [], [psutil.Process(p).cmdline()[:2] for p in left]
    finally:
        if proc.poll() is None:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        log.close()
        print((tmp_path / "serve.log").read_text()[-3000:])
