"""Mixtral (8x7B, 8x22B): GQA attention without biases, every layer's MLP a mixture of SwiGLU
experts under `block_sparse_moe`, softmax-top-k routing renormalised over the k."""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, common_fields
from moe.models.family import GATE_UP_DOWN, Family


def config(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        model_type="mixtral",
        **common_fields(raw, rope_default=1e6, eps_default=1e-5),
        num_local_experts=raw.get("num_local_experts", 8),
        num_experts_per_tok=raw.get("num_experts_per_tok", 2),
        norm_topk_prob=True,
        sliding_window=raw.get("sliding_window"),
    )


# the Hub's files say w1/w3/w2; llm-compressor under transformers 5 writes gate_proj/up_proj/down_proj
FAMILY = Family(
    "mixtral", "MixtralForCausalLM", config, "block_sparse_moe", (("w1", "w3", "w2"), GATE_UP_DOWN)
)
