"""The checkpoints users deploy, served by the cluster: a dense Mistral on the router alone, an
FP8 Mixtral over 2 expert shards, and `--quantization fp8`. A real local Ray cluster (one for
the module), real HTTP, the official openai client; greedy answers equal transformers'."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from cluster.messages import ShardInfo
from moe.checkpoint.fp8_export import write_dequantized, write_fp8
from moe.checkpoint.tiny import default_model_dir
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams
from tests.cluster_harness import Raymix, free_port, ray_cluster
from tests.conftest import hf_model

QUESTIONS = ["Hi", "What is a mixture of experts?", "Count from one to ten.", "x"]
SETTINGS = dict(max_model_len=512, kv_cache_memory_mb=64)


@pytest.fixture(scope="module")
def raymix():
    with ray_cluster():
        yield Raymix(free_port())


def reference_answers(model_dir, reference_dir=None, n=12, **engine) -> list[str]:
    """The in-process engine's greedy answers to QUESTIONS through the checkpoint's own chat
    format, after checking its tokens are transformers' (on `reference_dir`'s weights: the
    dequantized ones of an FP8 checkpoint)."""
    eng = LLMEngine.from_pretrained(model_dir, EngineConfig(max_model_len=512, **engine))
    assert eng.tokenizer is not None
    prompts = [eng.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    seqs = eng.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0))
    if reference_dir is not None:
        hf = hf_model(reference_dir)
        for p, seq in zip(prompts, seqs, strict=True):
            out = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p) :].tolist()
            assert seq.output_token_ids == out
    return [s.text for s in seqs]


def served_answers(client: openai.OpenAI, model: str, n=12) -> list[str]:
    return [
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=n, temperature=0
        )
        .choices[0]
        .message.content
        for q in QUESTIONS
    ]


def shard_infos(count: int) -> list[ShardInfo]:
    from ray import serve

    return [
        serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix").info.remote().result()
        for k in range(count)
    ]


def test_dense_mistral_served_by_the_router_alone(raymix, mistral_dir):
    """`raymix serve --model DIR` on a dense checkpoint with the default settings (2 expert
    shards, which do not apply): no shards, the checkpoint's own chat template, greedy answers
    equal to MistralForCausalLM's, streaming, logprobs and structured output."""
    url = raymix.deploy(model=str(mistral_dir), **SETTINGS)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    name = mistral_dir.name
    assert served_answers(client, name) == reference_answers(mistral_dir, mistral_dir)
    assert raymix.router_stats().expert_shards == 0
    stream = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == served_answers(client, name)[1]
    )
    r = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=2
    )
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "a number"}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    assert isinstance(json.loads(r.choices[0].message.content)["n"], int)
    card = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]
    assert card["quantization"] is None
    experts = httpx.get(f"{url}/experts", timeout=60).json()
    assert experts["shards"] == [] and experts["num_experts"] == 0  # a dense model: its MLPs are the router's


def test_fp8_mixtral_over_two_shards(raymix, tmp_path_factory):
    """An llm-compressor FP8 checkpoint (per-channel scales, dynamic activations, experts named
    gate_proj/up_proj/down_proj) over 2 shards: transformers' answers on its dequantized weights,
    each shard holding its experts in FP8 (half of bf16's bytes) and reading only those."""
    src = default_model_dir()
    q = write_fp8(src, tmp_path_factory.mktemp("fp8"), expert_names=1)
    ref = write_dequantized(q, tmp_path_factory.mktemp("fp8-ref"))
    url = raymix.deploy(model=str(q), expert_shards=2, **SETTINGS)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    assert served_answers(client, q.name) == reference_answers(q, ref)
    assert httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["quantization"] == "fp8"
    assert httpx.get(f"{url}/version", timeout=60).json()["quantization"] == "fp8"
    bf16_per_shard = LLMEngine.from_pretrained(src).experts.shards[0].num_parameters() * 2 / 2
    for k, info in enumerate(shard_infos(2)):
        assert info.experts_read == [4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3]
        assert 0.5 <= info.nbytes / bf16_per_shard < 0.51


def test_quantization_fp8_flag_on_the_embedded_model(raymix):
    """--quantization fp8 on an unquantized checkpoint: the answers of the in-process engine
    quantized the same way (tests/test_fp8.py checks that one against transformers)."""
    url = raymix.deploy(quantization="fp8", expert_shards=2, **SETTINGS)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    expected = reference_answers(default_model_dir(), quantization="fp8")
    assert served_answers(client, "raymix-tiny-mixtral") == expected
    assert httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["quantization"] == "fp8"
    fp32_per_shard = LLMEngine.from_pretrained(default_model_dir()).experts.shards[0].num_parameters() * 4 / 2
    assert all(0.25 <= info.nbytes / fp32_per_shard < 0.26 for info in shard_infos(2))
