"""raymix's API served by uvicorn on 127.0.0.1 over an in-process engine, as `raymix serve`
serves it but without Ray: for tests of what needs a real HTTP server and no cluster (real
clients, the web page's chat)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from api.app import build_api
from api.context import ServingContext
from api.engine_client import LocalEngineClient
from api.metrics import ServingMetrics
from cluster.config import RaymixSettings
from moe.engine.async_engine import AsyncEngine
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.tokenizer import load_tokenizer


@contextmanager
def local_server(
    model_dir: Path,
    max_model_len: int = 2048,
    build_engine: Callable[[], LLMEngine] | None = None,
    **settings: Any,
) -> Iterator[str]:
    """→ the server's base URL (http://127.0.0.1:<port>); stopped with its engine at the end.
    build_engine: makes the engine (default: the checkpoint's, in this process)."""
    engine = AsyncEngine(
        build_engine
        or (lambda: LLMEngine.from_pretrained(model_dir, EngineConfig(max_model_len=max_model_len)))
    )
    s = RaymixSettings(model=str(model_dir), **settings)
    ctx = ServingContext(s, LocalEngineClient(engine), load_tokenizer(model_dir), {}, ServingMetrics())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_api(ctx), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
