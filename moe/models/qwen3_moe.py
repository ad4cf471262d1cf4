"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder): RMSNorm of each q and k head before
RoPE, `head_dim` apart from the hidden size, 128 experts top-8 with `norm_topk_prob`, dense MLP
layers where `mlp_only_layers` / `decoder_sparse_step` say, one sliding window for every layer
when `use_sliding_window`."""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, common_fields
from moe.models.family import Family


def config(raw: dict[str, Any]) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        model_type="qwen3_moe",
        **common_fields(raw, rope_default=1e4, eps_default=1e-6),
        num_local_experts=raw.get("num_experts", raw.get("num_local_experts", 128)),
        num_experts_per_tok=raw.get("num_experts_per_tok", 8),
        moe_intermediate_size=raw.get("moe_intermediate_size", 768),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
        decoder_sparse_step=raw.get("decoder_sparse_step", 1),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window") else None,
    )


FAMILY = Family("qwen3_moe", "Qwen3MoeForCausalLM", config)
