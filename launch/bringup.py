"""Bring-up: start (or join) Ray, deploy the app, wait until the model answers, say where;
and the way down.

By default an embedded local Ray is started on 127.0.0.1 for this process; `address` joins an
existing cluster instead. `start` returns once /health is 200, i.e. the router has loaded the
dense part and every shard has loaded its experts and joined the data plane. A deployment that
cannot start (a bad checkpoint, a kernel this CPU lacks, no memory, no device) is a
`StartupError` holding its replica's own error as one line (`raymix: ExpertShard0 failed to
start: ...`), dug out of Serve's status, whose message ends with that line (so does the KubeRay
RayService's status, which shows Serve's).

The way down (`shutdown`): Serve stops taking requests and drains the ones in flight (each
deployment's graceful shutdown, up to drain_timeout_s), then Ray stops. A container runtime or
a terminal sends SIGTERM (or SIGINT) to the whole process group: had the embedded Ray's
daemons and workers been in it, they would die at once with the requests they serve, and the
drain would wait on a dead GCS. So `raymix serve` with an embedded Ray runs as two processes
(`supervise`): the one started, which only relays SIGTERM and SIGINT, and the server in a
session of its own with all of Ray under it. If the first is killed outright, the server is
told to stop (Linux's PR_SET_PDEATHSIG), and Ray's processes share the server's fate.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from cluster.config import RaymixSettings
from cluster.messages import APP_NAME, router_deployment_name
from deployments.app import build_app

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A deployment could not start: its replica's error, as one line."""


def init_ray(s: RaymixSettings, **ray_kwargs) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    if s.address:
        ray.init(address=s.address, **ray_kwargs)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **ray_kwargs)


def base_url(s: RaymixSettings) -> str:
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}"


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not become ready in {timeout:.0f}s ({last})")


def deploy(s: RaymixSettings, timeout: float = 600.0) -> str:
    """(Re)deploy raymix on the Ray this process is connected to; → the API's base URL once it
    serves."""
    from ray import serve

    s.model_dir()  # generate the embedded default once, here, before replicas race for it
    serve.start(http_options={"host": s.host, "port": s.port})
    try:
        serve.run(build_app(s), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:  # "Deploying application raymix failed": say why, in one line
        raise StartupError(startup_error() or str(e)) from None
    url = base_url(s)
    wait_healthy(url, timeout)
    return url


def startup_error() -> str | None:
    """The first failed deployment's replica error as one line ("Router failed to start: ..."),
    from Serve's status (its message is a traceback ending in the replica's exception), or None."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return None
    for name, d in app.deployments.items():
        if d.status in ("DEPLOY_FAILED", "UNHEALTHY") and d.message.strip():
            return f"{name} failed to start: {replica_error(d.message)}"
    return app.message or None


def replica_error(message: str) -> str:
    """The last line of a Serve deployment's message (a replica's traceback), without the
    exception's qualified class name: `moe.errors.CheckpointError: x.json: ...` → `x.json: ...`."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return re.sub(r"^[\w.]*(Error|Exception)\w*: ", "", lines[-1]) if lines else message


def start(s: RaymixSettings, timeout: float = 600.0, **ray_kwargs) -> str:
    """Start (or join) Ray and deploy raymix; → the API's base URL once it serves."""
    init_ray(s, **ray_kwargs)
    return deploy(s, timeout)


def curl_example(s: RaymixSettings, url: str) -> str:
    body = {
        "model": s.model_names()[0],
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 32,
    }
    auth = " -H 'Authorization: Bearer <your API key>'" if s.api_key else ""  # never the key itself
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{json.dumps(body)}'"


def shutdown(drain_timeout_s: float = 0.0, routers: int = 1) -> None:
    """Drain, then stop Serve and disconnect from Ray (an embedded Ray stops with it). The
    routers refuse new requests at once and wait for those in flight, up to drain_timeout_s
    (Serve's own graceful shutdown would not do: its proxy closes the clients' connections
    when it stops)."""
    import ray
    from ray import serve

    try:
        if drain_timeout_s > 0:
            handles = [
                serve.get_deployment_handle(router_deployment_name(i), app_name=APP_NAME)
                for i in range(routers)
            ]
            for response in [h.drain.remote(drain_timeout_s) for h in handles]:  # all at once
                response.result(timeout_s=drain_timeout_s + 10)
    except Exception as e:  # no app (it failed to start), or the router is gone
        log.warning("drain skipped: %s", e)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


SUPERVISED = "RAYMIX_SUPERVISED"  # set in the server process `supervise` starts


def supervise(argv: list[str]) -> int:
    """Run `raymix <argv>` again as the server, in a session of its own, relaying SIGTERM and
    SIGINT to it as SIGTERM; → its exit status, once it has drained and stopped."""
    argv, keys = keys_off_the_command_line(argv)
    child = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *argv],
        env={**os.environ, **keys, SUPERVISED: "1"},
        start_new_session=True,
        preexec_fn=_stop_with_parent,
    )

    def relay(*_: Any) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    rc = child.wait()
    return 128 - rc if rc < 0 else rc  # killed by signal n: the shell's 128 + n


KEY_FLAGS = {"--api-key": "RAYMIX_API_KEY", "--admin-api-key": "RAYMIX_ADMIN_API_KEY"}


def keys_off_the_command_line(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv without its key flags, and the keys as the environment variables the settings read:
    the server process's command line (which `ps` shows every user) carries no key."""
    rest: list[str] = []
    keys: dict[str, list[str]] = {}
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in KEY_FLAGS:
            keys.setdefault(KEY_FLAGS[flag], []).append(value if eq else next(it, ""))
        else:
            rest.append(arg)
    return rest, {name: ",".join(values) for name, values in keys.items()}  # the flags win, as in load()


def _stop_with_parent() -> None:
    """In the server before exec: SIGTERM when `supervise`'s process dies (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
