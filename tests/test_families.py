"""The families beyond Mixtral (Qwen3-MoE, Qwen2-MoE, OLMoE) against transformers' own class for
each (Qwen3MoeForCausalLM, ...), on tiny checkpoints transformers itself wrote: greedy outputs
token-identical under continuous batching over 1, 2 and 3 expert shards, with chunked prefill and
the prefix cache; logprobs within 1e-4; a shard reads only its experts; two eos ids; a block-FP8
Qwen3-MoE equal to transformers on its dequantized weights; an unknown family refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moe.checkpoint.fp8_export import write_dequantized, write_fp8
from moe.checkpoint.reader import CheckpointReader, expert_tensor_shapes, open_checkpoint
from moe.checkpoint.tiny_families import make_tiny_family
from moe.config import ModelConfig
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.errors import CheckpointError
from moe.expert_parallel.placement import partition_experts
from moe.layers.experts import LocalExperts
from moe.layers.fp8 import Fp8Tensor
from moe.layers.weights import Linear
from moe.sampling import SamplingParams
from tests.conftest import hf_model
from tests.test_reference import ARRIVALS, GREEDY, PROMPTS, hf_greedy

MORE = ["混合专家模型把每个词元路由到少数几个专家。", 'Emoji: 😀 🎉 and JSON {"a": 1}']


def engine(path, num_shards=1, **kw):
    return LLMEngine.from_pretrained(
        path, EngineConfig(max_model_len=256, device="cpu", **kw), num_shards=num_shards
    )


def prompts_of(eng: LLMEngine) -> list[list[int]]:
    assert eng.tokenizer is not None
    return [eng.tokenizer.encode(p) for p in PROMPTS + MORE]


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_greedy_token_identical_to_the_familys_transformers_class(family_dir, hf_models, num_shards):
    """Continuous batching (requests join at different steps), experts split over in-process
    shards through the cluster's dispatch and combine."""
    eng = engine(family_dir, num_shards=num_shards, block_size=8)
    prompts = prompts_of(eng)
    arrivals = [*ARRIVALS, 1, 3]
    hf = hf_models(family_dir)
    for prompt, seq in zip(prompts, eng.generate(prompts, GREEDY, arrival_steps=arrivals), strict=True):
        assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
    assert eng.stats().num_used_kv_blocks == 0


def test_chunked_prefill_and_the_prefix_cache_change_nothing(family_dir, hf_models):
    eng = engine(family_dir, max_num_batched_tokens=7, block_size=4, enable_prefix_caching=True)
    prompts = prompts_of(eng)
    shared = prompts[1][:12]  # a common prefix: the second round finds its blocks cached
    prompts = prompts + [shared + p for p in prompts[:3]]
    hf = hf_models(family_dir)
    want = [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    for _ in range(2):
        assert [s.output_token_ids for s in eng.generate(prompts, GREEDY)] == want
    assert eng.stats().prefix_cache_hits > 0


def test_logprobs_are_transformers_log_softmax(family_dir, hf_models):
    eng = engine(family_dir)
    prompts = prompts_of(eng)[:4]
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=3, prompt_logprobs=2)
    hf = hf_models(family_dir)
    for prompt, seq in zip(prompts, eng.generate(prompts, params), strict=True):
        ids = prompt + seq.output_token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)  # [N, V]
        got_prompt = torch.tensor([lp.logprob for lp in seq.prompt_logprobs[1:]])  # type: ignore[index, union-attr]
        want_prompt = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:], dtype=torch.long)]
        torch.testing.assert_close(got_prompt, want_prompt, rtol=0, atol=1e-4)
        for k, lp in enumerate(seq.logprobs):  # the sampled tokens' and their top-3
            row = ref[len(prompt) - 1 + k]
            assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
            assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


def test_a_shard_reads_only_its_own_experts(family_dirs):
    d = family_dirs("qwen3_moe")
    cfg, _, reader = open_checkpoint(d)
    assert cfg.num_local_experts == 128 and cfg.num_experts_per_tok == 8 and cfg.moe_layers == (0, 2)
    mine = partition_experts(cfg.num_local_experts, 3)[1]
    experts = LocalExperts.from_checkpoint(reader, cfg, mine, torch.float32)
    assert set(reader.tensors_read) == set(expert_tensor_shapes(cfg, mine))
    assert experts.expert_ids == mine and len(experts.gate_up) == 2  # its two MoE layers


def test_tied_embeddings(tmp_path, hf_models):
    d = make_tiny_family(tmp_path / "tied", "olmoe", seed=7, tie_word_embeddings=True)
    assert "lm_head.weight" not in CheckpointReader(d).weight_map
    eng = engine(d)
    prompts = prompts_of(eng)[:3]
    hf = hf_models(d)
    for prompt, seq in zip(prompts, eng.generate(prompts, GREEDY), strict=True):
        assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_generation_stops_on_either_eos_id(family_dirs):
    """generation_config.json lists <|im_end|> and <|endoftext|>: a sequence stops on either."""
    d = family_dirs("qwen3_moe")
    eng = engine(d)
    eos = json.loads((d / "generation_config.json").read_text())["eos_token_id"]
    assert len(eos) == 2 and set(eos) <= set(eng.eos_token_ids)
    prompt = prompts_of(eng)[0]
    (free,) = eng.generate([prompt], GREEDY)
    for stop in eos:  # the logit bias makes the 3rd token an eos: it ends there, without it
        bias = {stop: 100.0}
        params = SamplingParams(max_tokens=8, temperature=0.0, min_tokens=2, logit_bias=bias)
        (seq,) = eng.generate([prompt], params)
        assert seq.finish_reason == "stop" and seq.output_token_ids == [*free.output_token_ids[:2], stop]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_block_fp8_equals_transformers_on_its_dequantized_weights(family_dirs, tmp_path, model_type):
    """Qwen3's and DeepSeek-V3/R1's published FP8 checkpoints: AutoFP8's block variant (128x128
    `weight_scale_inv`; 32x32 here, the tiny models' sizes, so that some blocks are partial as
    DeepSeek-V3's kv_a_proj_with_mqa's 576 rows are), gates and LM head unquantized; MLA's
    kv_b_proj read dequantized (absorbed), the other projections held as FP8."""
    q = write_fp8(family_dirs(model_type), tmp_path / "fp8", "fp8", "block", "dynamic", block=(32, 32))
    ref = write_dequantized(q, tmp_path / "ref")
    raw = json.loads((q / "config.json").read_text())
    assert raw["quantization_config"]["weight_block_size"] == [32, 32]
    hf = hf_model(ref)
    for shards in (1, 2):
        eng = engine(q, num_shards=shards)
        assert isinstance(eng.experts.shards[0].gate_up[0], Fp8Tensor)  # held as FP8
        attn = eng.model.layers[0].self_attn
        assert isinstance(attn.o_proj, Linear) and isinstance(attn.o_proj.held, Fp8Tensor)
        prompts = prompts_of(eng)[:4]
        for prompt, seq in zip(
            prompts, eng.generate(prompts, GREEDY, arrival_steps=[0, 0, 1, 2]), strict=True
        ):
            assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_an_unknown_family_is_refused_in_one_line(family_dirs, tmp_path):
    d = shutil.copytree(family_dirs("olmoe"), tmp_path / "x")
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(raw | {"model_type": "gpt_oss"}))
    with pytest.raises(CheckpointError) as e:
        ModelConfig.from_pretrained(d)
    assert str(e.value) == (
        f"{d / 'config.json'}: model_type 'gpt_oss' is not supported "
        "(supported: deepseek_v2, deepseek_v3, mistral, mixtral, olmoe, qwen2_moe, qwen3_moe)"
    )


def test_sliding_window_in_some_layers_only_is_refused(family_dirs, tmp_path):
    d = shutil.copytree(family_dirs("qwen2_moe"), tmp_path / "w")
    raw = json.loads((d / "config.json").read_text())
    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    (d / "config.json").write_text(json.dumps(raw | {"use_sliding_window": True, "layer_types": kinds}))
    with pytest.raises(CheckpointError, match="window in some layers only"):
        ModelConfig.from_pretrained(d)


def test_the_padded_decode_step_changes_nothing(family_dir):
    """The static-buffer decode step the CUDA graphs capture (run uncaptured here) on each
    family's layers: q/k norms, biases, shared experts and dense layers inside it too."""
    base, padded = engine(family_dir), engine(family_dir, cuda_graphs=True)
    assert padded.decode is not None and base.decode is None
    prompts = prompts_of(base)
    want = [s.output_token_ids for s in base.generate(prompts, GREEDY)]
    assert [s.output_token_ids for s in padded.generate(prompts, GREEDY)] == want
    assert padded.decode.steps > 0
