"""Starting raymix on a real local Ray cluster for integration tests (one cluster per module)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time
from contextlib import contextmanager
from typing import Any

import httpx

from cluster.messages import RouterStats

# asked of the embedded model in the cluster tests (greedy answers checked against transformers)
QUESTIONS = [
    "Hi",
    "What is a mixture of experts?",
    "Count from one to ten.",
    "Write a haiku about routers.",
    "Why is the sky blue? Explain briefly.",
    "Translate 'hello' into French.",
    "x",
    "Tell me a very long story about eight experts who each only see a quarter of the tokens.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_cluster(**init_kwargs: Any):
    """A local Ray on 127.0.0.1 for this module; shut down (with Serve) at the end."""
    import ray
    from ray import serve

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **init_kwargs)
    try:
        yield ray
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


class Raymix:
    """Deploys (and redeploys) the raymix app on the module's Ray cluster."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.settings: dict[str, Any] | None = None

    def deploy(self, **settings: Any) -> str:
        from cluster.config import RaymixSettings
        from launch import bringup

        settings = {"port": self.port, **settings}
        if settings != self.settings:
            s = RaymixSettings(**settings)
            from ray import serve

            from deployments.app import build_app

            serve.start(http_options={"host": "127.0.0.1", "port": self.port})
            serve.run(build_app(s), name=bringup.APP_NAME, route_prefix="/", blocking=False)
            bringup.wait_healthy(self.url, timeout=300)
            self.settings = settings
        return self.url

    def router_stats(self) -> RouterStats:
        from ray import serve

        return serve.get_deployment_handle("Router", app_name="raymix").stats.remote().result()

    def wait_idle(self, timeout: float = 20.0) -> RouterStats:
        """Poll until no request runs or waits and no KV block is used; → the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.router_stats()
            idle = stats.engine.num_requests_running == 0 and stats.engine.num_requests_waiting == 0
            if (idle and stats.engine.num_used_kv_blocks == 0) or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """The sum of a series' samples in /metrics, over its label sets (the routers, say)."""
    text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=60).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.split("{")[0].split(" ")[0] == name
    ]
    if not values:
        raise KeyError(name)
    return sum(values)


def greedy_answer(client: Any, question: str, max_tokens: int, **extra: Any) -> str:
    """One greedy chat answer from the embedded model (`extra`: vLLM's extras, e.g. ignore_eos)."""
    r = client.chat.completions.create(
        model="raymix-tiny-mixtral",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra or None,
    )
    return r.choices[0].message.content


def greedy_answers(client: Any, questions: list[str], max_tokens: int, **extra: Any) -> list[str]:
    """The questions asked concurrently (they share the engine's batch), answers in order."""
    with cf.ThreadPoolExecutor(len(questions)) as pool:
        return list(pool.map(lambda q: greedy_answer(client, q, max_tokens, **extra), questions))


def same_id_requests(
    url: str, count: int, stream: bool, n: int = 1, headers: dict[str, str] | None = None
) -> list[tuple[int, list[str], str]]:
    """`count` chat requests at once that all carry the X-Request-Id "trace-shared" → (status,
    text of each choice, X-Request-Id answered) per request."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True}
    body |= {"n": n, "stream": stream}
    headers = {**(headers or {}), "X-Request-Id": "trace-shared"}

    def one(_: int) -> tuple[int, list[str], str]:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            raw = r.read().decode()
        if not stream:
            choices = json.loads(raw)["choices"] if r.status_code == 200 else []
            return r.status_code, [c["message"]["content"] for c in choices], r.headers["x-request-id"]
        texts = [""] * n
        for line in raw.splitlines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["delta"].get("content") or ""
        return r.status_code, texts, r.headers["x-request-id"]

    with cf.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def reference_answers(questions: list[str], max_tokens: int) -> list[str]:
    """Greedy chat answers of the in-process engine on the embedded model, each checked token
    for token against transformers' MixtralForCausalLM on the same checkpoint."""
    import torch
    from transformers import MixtralForCausalLM

    from moe.checkpoint.tiny import default_model_dir
    from moe.engine.llm_engine import EngineConfig, LLMEngine
    from moe.sampling import SamplingParams

    model_dir = default_model_dir()
    eng = LLMEngine.from_pretrained(model_dir, EngineConfig(max_model_len=512))
    hf = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(eng.device).eval()
    prompts = [eng.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    seqs = eng.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    for p, s in zip(prompts, seqs, strict=True):
        out = hf.generate(torch.tensor([p], device=eng.device), max_new_tokens=max_tokens, do_sample=False)
        assert s.output_token_ids == out[0, len(p) :].tolist()  # the engine is transformers, token for token
    return [s.text for s in seqs]


@contextmanager
def clients_asking(client: Any, workers: int = 4):
    """`workers` clients ask QUESTIONS in turn (greedy, 16 tokens each) until the block ends →
    (done: (question index, answer) per request answered, errors), filled as they come."""
    import threading

    stop = threading.Event()
    done: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        i = w
        while not stop.is_set():
            q = i % len(QUESTIONS)
            try:
                done.append((q, greedy_answer(client, QUESTIONS[q], 16)))
            except BaseException as e:
                errors.append(e)
            i += workers

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    try:
        yield done, errors
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)


def stream_chat(url: str, question: str, max_tokens: int = 48) -> str:
    """One greedy streamed chat answer (ignore_eos: always `max_tokens`); a non-200 or an error
    event in the stream fails the caller."""
    text, end = stream_chat_ending(url, question, max_tokens)
    assert end == "length", end
    return text


def stream_chat_ending(
    url: str, question: str, max_tokens: int = 48, seen: list[dict[str, Any]] | None = None
) -> tuple[str, str]:
    """One greedy streamed chat answer (ignore_eos) and how it ended: its finish_reason, "error"
    for an error event, "status N" for a non-200, "cut" when the connection broke or it ended
    with none; `seen` gets each chunk as it comes (a caller can watch the stream progress)."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    text, end = "", "cut"
    try:
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={**body, "ignore_eos": True, "stream": True},
            timeout=300,
        ) as r:
            if r.status_code != 200:
                return text, f"status {r.status_code}"
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if seen is not None:
                    seen.append(chunk)
                if "error" in chunk:
                    return text, "error"
                for c in chunk["choices"]:
                    text += c["delta"].get("content") or ""
                    end = c.get("finish_reason") or end
    except httpx.HTTPError:
        return text, "cut"
    return text, end


def stream_all(url: str, questions: list[str], during: Any = None) -> list[str]:
    """The questions streamed at once (`stream_chat`), `during()` run meanwhile; answers in order."""
    with cf.ThreadPoolExecutor(len(questions)) as pool:
        futures = [pool.submit(stream_chat, url, q) for q in questions]
        if during is not None:
            during()
        return [f.result() for f in futures]


def wait_until(condition: Any, timeout: float = 60.0) -> bool:
    """Poll `condition()` every 50 ms until it holds or `timeout` passes → whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
