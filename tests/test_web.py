"""The web page at `/` in a real browser: headless Chromium (Debian's `chromium`, found on PATH or
at $RAYMIX_CHROMIUM; never downloaded) driven by Playwright's Python package.

The chat playground is tested over the in-process API (no Ray needed), the expert view on a
real Ray cluster with two expert shards: its heatmap follows traffic, its rebalance button
works and is refused without the key, and a killed shard goes red and comes back. Every page
is watched for console errors. Screenshots go to $RAYMIX_SCREENSHOTS (default
test-results/screenshots/).

Without Chromium these tests skip with a message, except where RAYMIX_REQUIRE_BROWSER is set
(CI sets it, and `.ci/run` installs Chromium first), where they fail instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster.messages import ShardInfo
from tests.cluster_harness import Raymix, free_port, greedy_answers, ray_cluster
from tests.local_server import local_server

KEY = "sk-raymix-web"
SHOTS = Path(
    os.environ.get("RAYMIX_SCREENSHOTS", Path(__file__).parent.parent / "test-results" / "screenshots")
)
CHROMIUM_ARGS = [  # a closed network: no background connections to Google's hosts
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def chromium_path() -> str | None:
    return os.environ.get("RAYMIX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    required = bool(os.environ.get("RAYMIX_REQUIRE_BROWSER"))
    if path is None:
        message = "no Chromium here: `apt-get install chromium` (or set RAYMIX_CHROMIUM) to run the web page's browser tests"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A browser page on the server at `url`, with the API key set (or not) and its console
    errors collected."""

    def __init__(self, browser: Any, url: str, key: str | None, width: int = 1280, height: int = 900):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        if key is not None:
            self.page.add_init_script(f"localStorage.setItem('raymix.apiKey', {json.dumps(key)})")
        self.url = url

    def open(self, view: str = "chat") -> Any:
        self.page.goto(f"{self.url}/#{view}")
        self.page.wait_for_load_state("networkidle")
        return self.page

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def local_url(tiny_dir) -> Iterator[str]:
    with local_server(tiny_dir, api_key=[KEY], served_model_name=["tiny", "tiny-alias"]) as url:
        yield url


def set_settings(page: Any, **values: Any) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def ask(page: Any, text: str, until: str = ".stats") -> Any:
    """Send a message; → the answer's box once `until` is in it (the stats line: the stream ended)."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_selector(f".msg.assistant:last-child {until}", timeout=60_000)
    return page.locator(".msg.assistant").last


# ---- the chat playground (in-process API, no Ray) ----


def test_chat_streams_the_api_answer_into_the_page(browser, local_url):
    """A chat round trip: the answer arrives in several pieces (counted as the page changes),
    ends as exactly the API's own answer to the same request, and shows TTFT, tok/s and usage."""
    p = Page(browser, local_url, KEY)
    page = p.open()
    page.wait_for_function("() => document.querySelectorAll('#model option').length == 2")
    page.select_option("#model", "tiny-alias")
    set_settings(page, system="You are terse.", temperature=0, max_tokens=24, seed=7)
    page.evaluate(
        """() => { window.textSeen = new Set();
        new MutationObserver(() => { const c = document.querySelector('.msg.assistant:last-child .content');
          if (c) window.textSeen.add(c.textContent); })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }"""
    )
    answer = ask(page, "Tell me about experts.")
    shown = answer.locator(".content").inner_text()
    pieces = page.evaluate("() => window.textSeen.size")
    stats = answer.locator(".stats").inner_text()
    p.screenshot("chat")

    reference = httpx.post(
        f"{local_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "tiny-alias",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Tell me about experts."},
            ],
            "temperature": 0,
            "max_tokens": 24,
            "seed": 7,
        },
        timeout=60,
    ).json()
    expected = reference["choices"][0]["message"]["content"]
    assert shown.strip() == expected.strip()
    assert pieces >= 3, f"the answer did not stream: {pieces} distinct texts seen"
    assert "TTFT" in stats and "tok/s" in stats, stats
    usage = reference["usage"]
    assert f"{usage['prompt_tokens']} prompt + 24 completion = {usage['total_tokens']} tokens" in stats, stats

    page.reload()  # the conversation is kept in the browser
    page.wait_for_selector(".msg.assistant .content")
    assert page.locator(".msg.user .content").inner_text() == "Tell me about experts."
    assert page.locator(".msg.assistant .content").inner_text().strip() == expected.strip()
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert p.errors == []
    p.close()


def test_chat_structured_output_and_tool_calls(browser, local_url):
    """A JSON schema in its box makes the answer that JSON; tools with tool choice `required`
    show the answer as a tool call (name and arguments), not as text."""
    p = Page(browser, local_url, KEY)
    page = p.open()
    page.click("#new-chat")
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    set_settings(page, temperature=1, max_tokens=64, schema=json.dumps(schema))
    answer = json.loads(ask(page, "Answer in JSON.").locator(".content").inner_text())
    assert isinstance(answer["answer"], str)

    page.click("#new-chat")
    set_settings(page, schema="", tools=json.dumps([WEATHER_TOOL]))
    page.select_option("#tool_choice", "required")
    box = ask(page, "What is the weather in Paris?")
    assert box.locator(".tool-name").first.inner_text() == "tool call: get_weather"
    arguments = json.loads(box.locator(".tool-args").first.inner_text())
    assert isinstance(arguments["city"], str)
    assert box.locator(".content").count() == 0  # the call's JSON is not shown as text
    p.screenshot("chat-tool-call")
    box.locator(".tool-result").fill('{"temperature": 21}')
    box.locator(".tool-result").dispatch_event("change")
    page.select_option("#tool_choice", "none")  # the tool's result goes back with the next turn
    follow_up = ask(page, "Thanks. And tomorrow?")
    assert follow_up.locator(".error").count() == 0
    assert "finish: " in follow_up.locator(".stats").inner_text()
    assert p.errors == []
    p.close()


def test_chat_without_the_key_and_at_phone_width(browser, local_url):
    """With keys set and none entered the page says a key is needed and the answer shows the
    server's refusal; entering the key makes the next message work. At phone width nothing
    overflows sideways and the composer is on screen."""
    p = Page(browser, local_url, None, width=390, height=844)
    page = p.open()
    page.wait_for_selector("#notice:not([hidden])")
    assert "API key" in page.locator("#notice").inner_text()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    assert page.locator("#settings").get_attribute("open") is None  # folded: the chat first
    assert page.locator("#prompt").is_visible()
    refused = ask(page, "Hello?", until=".error").locator(".error").inner_text()
    assert "Incorrect API key" in refused
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.click("#settings summary")
    set_settings(page, max_tokens=8)
    page.click("#settings summary")
    answer = ask(page, "Hello again?")
    assert answer.locator(".error").count() == 0
    assert "8 completion" in answer.locator(".stats").inner_text()
    p.screenshot("chat-phone")
    # the only console errors: the browser's own lines for the two 401 answers
    assert p.errors and all("401" in e for e in p.errors), p.errors
    p.close()


# ---- the expert view (a real Ray cluster with two expert shards) ----


@pytest.fixture(scope="module")
def cluster(browser) -> Iterator[Raymix]:
    with ray_cluster():
        r = Raymix(free_port())
        r.deploy(
            expert_shards=2,
            num_redundant_experts=2,
            api_key=[KEY],
            max_model_len=256,
            kv_cache_memory_mb=32,
        )
        yield r


HEAT = "[...document.querySelectorAll('#heatmap .cell')].reduce((a, c) => a + Number(c.dataset.tokens), 0)"


def heat(page: Any) -> int:
    """The heatmap's tokens, all cells together."""
    return page.evaluate(f"() => {HEAT}")


def shard_info(k: int) -> ShardInfo:
    """Shard k's own `info`, asked from a worker thread (Playwright's sync API runs an event
    loop in this one, where Serve's blocking calls refuse to run)."""
    from ray import serve

    handle = serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix")
    with cf.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: handle.info.remote().result()).result()


def shard_experts(k: int) -> list[int]:
    return shard_info(k).expert_ids


def test_expert_view_follows_traffic(browser, cluster):
    """The heatmap fills with the tokens the traffic routed; each shard's card lists the
    experts that shard holds, healthy, with a round trip per layer."""
    p = Page(browser, cluster.url, KEY)
    page = p.open("experts")
    page.wait_for_selector(".shard")
    before = heat(page)
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    greedy_answers(client, [f"Tell me about expert {i}." for i in range(4)], 16, ignore_eos=True)
    page.wait_for_function(f"() => {HEAT} > {before}")
    assert heat(page) > before
    status = httpx.get(
        f"{cluster.url}/experts", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ).json()
    assert page.locator("#heatmap .cell").count() == status["num_layers"] * status["num_experts"]
    for k in range(2):
        card = page.locator(f'.shard[data-shard="{k}"]')
        assert card.get_attribute("data-healthy") == "true"
        chips = card.locator(".chip").all_inner_texts()
        assert sorted(int(c[1:].split()[0]) for c in chips) == sorted(shard_experts(k))
        assert "ms" in card.locator(".latency").inner_text()
    router = page.locator('.router[data-router="0"]')  # the one router, ready, with its batch
    assert router.get_attribute("data-router") == "0" and "running" in router.inner_text()
    assert status["routers"][0]["ready"] is True
    p.screenshot("experts")
    assert p.errors == []
    p.close()


def test_rebalance_button_needs_the_key_and_replicates_hot_experts(browser, cluster):
    """Without the key the expert view is refused (with keys set, only the page's files are
    public), the button's answer is the server's refusal and nothing moves; with it, after a
    skewed workload, the hot experts get replicas, marked on their new shards' cards and held
    by those shards."""
    p = Page(browser, cluster.url, None)
    page = p.open("experts")
    page.click("#rebalance")
    page.wait_for_selector("#rebalance-result.error")
    assert "Incorrect API key" in page.locator("#rebalance-result").inner_text()
    assert page.locator(".chip.replica").count() == 0
    assert all("401" in e for e in p.errors), p.errors
    p.close()

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    greedy_answers(client, ["the the the the the the the the"] * 6, 32, ignore_eos=True)
    p = Page(browser, cluster.url, KEY)
    page = p.open("experts")
    page.wait_for_selector(".shard")
    page.click("#rebalance")
    page.wait_for_selector("#rebalance-result.ok")
    result = page.locator("#rebalance-result").inner_text()
    assert result.startswith("Rebalanced"), result
    page.wait_for_selector(".chip.replica")
    for k in range(2):
        replicas = page.locator(f'.shard[data-shard="{k}"] .chip.replica').all_inner_texts()
        for chip in replicas:
            assert int(chip[1:].split()[0]) in shard_experts(k)
    p.screenshot("experts-rebalanced")
    assert p.errors == []
    p.close()


def test_killed_shard_goes_red_and_back(browser, cluster):
    """A shard whose process dies shows red (unreachable) while Serve replaces it, then healthy
    again with a new process id."""
    p = Page(browser, cluster.url, KEY)
    page = p.open("experts")
    card = '.shard[data-shard="1"]'
    page.wait_for_selector(f'{card}[data-healthy="true"]')
    pid = shard_info(1).pid
    os.kill(pid, signal.SIGKILL)
    page.wait_for_selector(f'{card}[data-healthy="false"]', timeout=30_000)
    p.screenshot("experts-shard-down")
    started = time.monotonic()
    page.wait_for_selector(f'{card}[data-healthy="true"]', timeout=120_000)
    print(f"shard 1 healthy again after {time.monotonic() - started:.1f}s")
    assert f"pid {pid}" not in page.locator(card).inner_text()
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert greedy_answers(client, ["After the shard came back."], 8)  # and serving goes on
    assert p.errors == []
    p.close()
