"""The families beyond Mixtral served by the cluster: a real local Ray cluster, real HTTP, the
official openai client. One Ray cluster for the module; each family is deployed with its experts
over shards (Qwen3-MoE and DeepSeek-V3 over 3, OLMoE over 2) or in the router's process (Qwen2-MoE,
--expert-shards 0), and its greedy chat, stream and completions answers (with logprobs) are
transformers' own class's, token for token (DeepSeek-V3 at its published 256 experts top-8 in
8 groups, over 3 shards). The expert view's heatmap shows those 256 experts a column each, in a
browser."""

from __future__ import annotations

import concurrent.futures as cf
import math

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from tests.cluster_harness import Raymix, free_port, ray_cluster
from tests.conftest import hf_model
from tests.test_reference import hf_greedy
from tests.test_web import HEAT, Page, browser, heat  # noqa: F401 (browser: the module's Chromium)

QUESTIONS = ["Hi", "混合专家模型是什么?", "Count from one to ten.", "Emoji 😀 please", "x"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def raymix():
    with ray_cluster():
        yield Raymix(free_port())


def chat_prompt(tok, question: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )["input_ids"]


@pytest.mark.parametrize(
    ("model_type", "shards"), [("qwen2_moe", 0), ("olmoe", 2), ("qwen3_moe", 3), ("deepseek_v3_256", 3)]
)  # the view reuses the last
def test_greedy_http_equals_the_familys_transformers_class(raymix, family_dirs, model_type, shards):
    d = family_dirs(model_type)
    url = raymix.deploy(model=str(d), expert_shards=shards, max_model_len=256, kv_cache_memory_mb=32)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    tok = AutoTokenizer.from_pretrained(str(d))
    hf = hf_model(d)
    kw = dict(max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})

    def ask(q: str):
        return client.chat.completions.create(model=d.name, messages=[{"role": "user", "content": q}], **kw)

    with cf.ThreadPoolExecutor(len(QUESTIONS)) as pool:  # concurrent: they share the engine's batch
        answers = list(pool.map(ask, QUESTIONS))
    for q, a in zip(QUESTIONS, answers, strict=True):
        want = hf_greedy(hf, chat_prompt(tok, q), MAX_TOKENS)
        assert a.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
        assert a.usage.completion_tokens == MAX_TOKENS
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=d.name, messages=[{"role": "user", "content": QUESTIONS[1]}], stream=True, **kw
        )
        if c.choices
    )
    assert streamed == answers[1].choices[0].message.content
    # completions with logprobs: transformers' log-softmax of each greedy token, within 1e-4
    ids = tok.encode("The router computes")
    r = client.completions.create(model=d.name, prompt=ids, max_tokens=4, temperature=0, logprobs=2)
    out = hf_greedy(hf, ids, 4)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids + out])).logits[0].float(), -1)
    got = r.choices[0].logprobs.token_logprobs
    want = [ref[len(ids) - 1 + k, t].item() for k, t in enumerate(out)]
    assert all(math.isclose(g, w, abs_tol=1e-4) for g, w in zip(got, want, strict=True))
    status = httpx.get(f"{url}/experts", timeout=30).json()
    experts = getattr(hf.config, "num_experts", None) or hf.config.n_routed_experts
    assert status["num_experts"] == experts and len(status["shards"]) == shards


def test_the_expert_view_shows_256_experts(raymix, family_dirs, browser):  # noqa: F811
    """DeepSeek-V3's 256 experts (top-8 in 8 groups) over 3 shards: one narrow column each, all
    on screen at once, every 16th named, each shard's experts as ranges (86, 85, 85); the heatmap fills with
    traffic."""
    d = family_dirs("deepseek_v3_256")
    url = raymix.deploy(model=str(d), expert_shards=3, max_model_len=256, kv_cache_memory_mb=32)
    p = Page(browser, url, None)
    page = p.open("experts")
    page.wait_for_selector(".shard")
    before = heat(page)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    for q in QUESTIONS:
        client.chat.completions.create(model=d.name, messages=[{"role": "user", "content": q}], max_tokens=8)
    page.wait_for_function(f"() => {HEAT} > {before}")
    assert page.locator("#heatmap.dense").count() == 1
    assert page.locator("#heatmap .cell").count() == 2 * 256  # its two MoE layers (the first is dense)
    # every expert on screen at once: the grid does not scroll sideways at a laptop's width
    assert page.evaluate(
        "() => { const g = document.getElementById('heatmap'); return g.scrollWidth <= g.clientWidth; }"
    )
    assert page.locator(".shard:not(.router)").count() == 3
    assert page.locator('.shard[data-shard="0"] .chip').all_inner_texts() == ["E0–85"]
    p.screenshot("experts-256")
    assert p.errors == []
    p.close()
