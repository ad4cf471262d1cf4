"""Shared fixtures: tiny checkpoints written once per test session, and their transformers twins."""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP's idle threads sleep rather than spin: the test processes, the Ray workers they start
# (which inherit it) and the other pytest worker share two cores (3x slower tests otherwise)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from moe.checkpoint.tiny import make_tiny
from moe.checkpoint.tiny_families import make_tiny_family
from moe.layers.attention import AttentionMetadata
from moe.models import family
from moe.sampling import SamplingParams

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: one compute thread each
    torch.set_num_threads(1)

# A second shape, different in every size: no GQA sharing ratio of the default, 4 experts,
# Mixtral 8x7B's v1 tokenizer, a sliding window shorter than the prompts, a sharded checkpoint.
OTHER_SIZES = dict(
    hidden_size=128,
    intermediate_size=320,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    rope_theta=10000.0,
)
OTHER = dict(OTHER_SIZES, num_local_experts=4, sliding_window=7)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("other"), seed=1, tokenizer="v1", num_files=3, **OTHER)


@pytest.fixture(scope="session", params=["tiny", "other"])
def model_dir(request, tiny_dir, other_dir):
    return tiny_dir if request.param == "tiny" else other_dir


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    """A tiny dense Mistral, as Mistral-7B-Instruct-v0.2 is laid out: v1 tokenizer, its chat
    template in tokenizer_config.json (no tokenizer.model.v* file), no sliding window."""
    d = tmp_path_factory.mktemp("mistral")
    return make_tiny(d, seed=2, tokenizer="v1", mistral_tokenizer_file=False, model_type="mistral")


@pytest.fixture(scope="session")
def mistral_window_dir(tmp_path_factory):
    """A tiny dense Mistral with a sliding window shorter than the prompts (Mistral-7B-v0.1's)."""
    d = tmp_path_factory.mktemp("mistral-window")
    return make_tiny(d, seed=3, num_files=2, model_type="mistral", sliding_window=6, **OTHER_SIZES)


FAMILIES = [
    "qwen3_moe",
    "qwen2_moe",
    "olmoe",
    "deepseek_v3",
    "deepseek_v2",
]  # made by transformers (moe.checkpoint.tiny_families)
# variants: a family at another shape (DeepSeek-V3's 256 experts top-8 in 8 groups)
VARIANTS = {
    "deepseek_v3_256": (
        "deepseek_v3",
        dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4),
    )
}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """A tiny checkpoint of each family beyond Mixtral, written once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model_type, overrides = VARIANTS.get(name, (name, {}))
            cache[name] = make_tiny_family(tmp_path_factory.mktemp(name), model_type, seed=5, **overrides)
        return cache[name]

    return get


@pytest.fixture(scope="session", params=FAMILIES)
def family_dir(request, family_dirs):
    return family_dirs(request.param)


def hf_model(path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """transformers' own class for the checkpoint's family (MixtralForCausalLM, MistralForCausalLM,
    Qwen3MoeForCausalLM, ...)."""
    import json

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "mixtral")
    assert type(model).__name__ == family(model_type).architecture
    return model


@pytest.fixture(scope="session")
def hf_models(device):
    """transformers' model of a checkpoint, fp32, on the device the engine runs on (the
    reference is compared where the engine computes: CPU against CPU, CUDA against CUDA)."""
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = hf_model(path, device)
        return cache[path]

    return get


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the unit tests run: the GPU when there is one (the same code paths users serve
    from), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def all_position_logits(eng, token_ids: list[int]) -> torch.Tensor:
    """The engine's logits [N, V] at every position of `token_ids`, as one prefill (a request
    that is then aborted: the engine is left as it was)."""
    eng.add_request("x", token_ids, SamplingParams(max_tokens=1))
    ((_, n),) = eng.scheduler.schedule()
    bs = eng.blocks.block_size
    meta = AttentionMetadata.build([eng.blocks.tables["x"]], [n], [n], bs, eng.cfg.sliding_window, eng.device)
    (hidden,) = eng.model([(torch.tensor(token_ids, device=eng.device), meta)], eng.kv_cache, eng.experts)
    eng.abort_request("x")
    return eng.model.compute_logits(hidden)
