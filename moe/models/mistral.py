"""Mistral (7B v0.1-v0.3): Mixtral's attention with a dense SwiGLU MLP in every layer; the whole
model is the router's (no experts, no shards)."""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, common_fields
from moe.models.family import Family


def config(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        model_type="mistral",
        **common_fields(raw, rope_default=1e4, eps_default=1e-6),
        num_local_experts=0,
        sliding_window=raw.get("sliding_window"),
    )


FAMILY = Family("mistral", "MistralForCausalLM", config)
