"""The dense Mistral (model_type mistral, Mistral-7B's architecture) in process: greedy
token-identical to transformers' MistralForCausalLM with and without a sliding window, under
continuous batching, chunked prefill and the padded decode step of the CUDA graphs; FP8 too;
the checkpoint's own chat template; no expert shards for it."""

from __future__ import annotations

import logging

import pytest

from cluster.config import RaymixSettings
from cluster.placement import deployment_plan
from moe.checkpoint.fp8_export import write_dequantized, write_fp8
from moe.config import ModelConfig
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams
from tests.conftest import hf_model
from tests.test_reference import ARRIVALS, PROMPTS, hf_greedy

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(params=["no-window", "window"])
def dense_dir(request, mistral_dir, mistral_window_dir):
    return mistral_dir if request.param == "no-window" else mistral_window_dir


@pytest.mark.parametrize("engine", [{}, {"max_num_batched_tokens": 5}, {"cuda_graphs": True}])
def test_greedy_token_identical_to_mistral_for_causal_lm(dense_dir, device, engine):
    cfg = ModelConfig.from_pretrained(dense_dir)
    assert not cfg.is_moe and cfg.num_local_experts == 0
    eng = LLMEngine.from_pretrained(dense_dir, EngineConfig(max_model_len=256, block_size=4, **engine))
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    hf = hf_model(dense_dir, device)
    assert type(hf).__name__ == "MistralForCausalLM"
    for prompt, seq in zip(prompts, eng.generate(prompts, GREEDY, arrival_steps=ARRIVALS), strict=True):
        assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
    assert eng.stats().num_used_kv_blocks == 0


def test_fp8_dense_mistral(mistral_window_dir, tmp_path_factory, device):
    q = write_fp8(
        mistral_window_dir, tmp_path_factory.mktemp("q"), "fp8", "tensor", "static", ignore=("lm_head",)
    )
    ref = write_dequantized(q, tmp_path_factory.mktemp("ref"))
    eng = LLMEngine.from_pretrained(q, EngineConfig(max_model_len=256))
    hf = hf_model(ref, device)
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    for prompt, seq in zip(prompts, eng.generate(prompts, GREEDY, arrival_steps=ARRIVALS), strict=True):
        assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_the_checkpoints_own_chat_template(mistral_dir):
    """Mistral-7B-v0.2 ships no tokenizer.model.v* file: its chat template is the one in
    tokenizer_config.json, applied as transformers applies it."""
    from transformers import AutoTokenizer

    eng = LLMEngine.from_pretrained(mistral_dir, EngineConfig(max_model_len=256))
    assert eng.tokenizer is not None and eng.tokenizer.mode == "hf"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    ]
    theirs = AutoTokenizer.from_pretrained(str(mistral_dir)).apply_chat_template(messages, tokenize=True)
    assert eng.tokenizer.apply_chat_template(messages) == list(getattr(theirs, "input_ids", theirs))


def test_a_dense_model_has_no_expert_shards(mistral_dir, caplog):
    cfg = ModelConfig.from_pretrained(mistral_dir)
    assert deployment_plan(RaymixSettings(model=str(mistral_dir)), cfg, gpus=2).expert_groups == []
    with caplog.at_level(logging.WARNING):
        plan = deployment_plan(RaymixSettings(model=str(mistral_dir), expert_shards=4), cfg, gpus=0)
    assert plan.expert_groups == []
    assert "expert_shards=4 ignored" in caplog.text and "no experts to shard" in caplog.text
    one_gpu = deployment_plan(RaymixSettings(model=str(mistral_dir)), cfg, gpus=1)
    assert one_gpu.router_options["num_gpus"] == 1.0  # the router has the GPU to itself
