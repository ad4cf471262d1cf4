"""`raymix serve` stopped as a container runtime or a terminal stops it: SIGTERM to its whole
process group while a stream runs. It stops taking requests, lets the stream finish (the
drain), and exits with every process it started gone, Ray's included. And `raymix serve` whose
router cannot start says why in one line and exits 1. Its own Ray (the embedded one `raymix
serve` starts), on 127.0.0.1; each run bounded in time."""

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

from launch.bringup import replica_error, wait_healthy
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


def test_a_router_that_cannot_start_is_reported_in_one_line(tmp_path):
    """The router's engine fails to build (a context that its KV cache cannot hold): `raymix
    serve` prints the replica's own error as one line, no Ray traceback, and exits 1."""
    raymix = Path(sys.executable).parent / "raymix"
    args = ["--port", str(free_port()), "--expert-shards", "0", "--max-model-len", "4096"]
    done = subprocess.run(
        [str(raymix), "serve", *args, "--kv-cache-memory-mb", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("raymix: Router failed to start: max_model_len 4096 does not fit"), last
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout


def test_a_replicas_error_is_the_last_line_of_serves_message():
    message = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with its "
        "constructor or initial health check failing. See controller logs for details. Error:\n"
        "ray::ServeReplica:raymix:ExpertShard0.initialize_and_get_metadata() (pid=7120)\n"
        '  File "/x/replica.py", line 1928, in initialize\n'
        "    raise RuntimeError(traceback.format_exc()) from None\n"
        "moe.errors.CheckpointError: /m/config.json: model_type 'gpt2' is not supported\n"
    )
    assert replica_error(message) == "/m/config.json: model_type 'gpt2' is not supported"
    assert replica_error("RuntimeError: CUDA out of memory") == "CUDA out of memory"
