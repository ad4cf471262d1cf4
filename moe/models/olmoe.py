"""OLMoE (OLMoE-1B-7B): RMSNorm over the whole q and k projections before they are split into
heads, an optional clamp of q, k and v (`clip_qkv`), 64 experts top-8 in every layer, whose width
is `intermediate_size`."""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, common_fields
from moe.models.family import Family


def config(raw: dict[str, Any]) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    fields = common_fields(raw, rope_default=1e4, eps_default=1e-5)
    fields.pop("head_dim", None)  # its q/k norms are sized for hidden_size / heads
    return ModelConfig(
        model_type="olmoe",
        **fields,
        num_local_experts=raw.get("num_experts", 64),
        num_experts_per_tok=raw.get("num_experts_per_tok", 8),
        moe_intermediate_size=raw.get("intermediate_size", 2048),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="proj",
        clip_qkv=raw.get("clip_qkv"),
    )


FAMILY = Family("olmoe", "OlmoeForCausalLM", config)
