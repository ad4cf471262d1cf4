"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v with biases, and beside the routed experts
a shared expert whose output a sigmoid gate scales, computed on the router while the shards
compute the routed ones; `norm_topk_prob` false in the published configs."""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, common_fields
from moe.errors import CheckpointError
from moe.models.family import Family


def config(raw: dict[str, Any]) -> ModelConfig:
    window = None
    if raw.get("use_sliding_window"):
        n = raw["num_hidden_layers"]
        kinds = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < raw.get("max_window_layers", 28) else "full_attention"
            for i in range(n)
        ]
        if set(kinds) != {"sliding_attention"}:
            raise CheckpointError("use_sliding_window with a window in some layers only is not supported")
        window = raw.get("sliding_window")
    return ModelConfig(
        model_type="qwen2_moe",
        **common_fields(raw, rope_default=1e4, eps_default=1e-6),
        num_local_experts=raw.get("num_experts", 60),
        num_experts_per_tok=raw.get("num_experts_per_tok", 4),
        moe_intermediate_size=raw.get("moe_intermediate_size", 1408),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 5632),
        mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
        decoder_sparse_step=raw.get("decoder_sparse_step", 1),
        qkv_bias=bool(raw.get("qkv_bias", True)),
        sliding_window=window,
    )


FAMILY = Family("qwen2_moe", "Qwen2MoeForCausalLM", config)
