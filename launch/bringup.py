"""Bring-up: start (or join) Ray, deploy the app, wait until the model answers, say where.

By default an embedded local Ray is started on 127.0.0.1 for this process; `address` joins an
existing cluster instead. `start` returns once /health is 200, i.e. the router has loaded the
dense part and every shard has loaded its experts and joined the data plane.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request

from cluster.config import RaymixSettings
from cluster.messages import APP_NAME
from deployments.app import build_app

log = logging.getLogger(__name__)


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
    serve.run(build_app(s), name=APP_NAME, route_prefix="/", blocking=False)
    url = base_url(s)
    wait_healthy(url, timeout)
    return url


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
    auth = f" -H 'Authorization: Bearer {s.api_key[0]}'" if s.api_key else ""
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{json.dumps(body)}'"


def shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
