"""DeepSeek-V2 (V2, V2-Lite, V2.5): DeepSeek-V3's multi-head latent attention (V2-Lite without a
q down-projection), its rotary pairs as complex numbers (the same scores as V3's interleaved
pairs), softmax routing, greedy or within the best groups by their best expert
(`topk_method: group_limited_greedy`), the weights scaled by `routed_scaling_factor` and, as in
transformers' DeepseekV2, never renormalised (the published configs say norm_topk_prob false)."""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig
from moe.models.deepseek_v3 import mla_fields
from moe.models.family import Family

# transformers' DeepseekV2Config defaults, for what a config.json leaves out
DEFAULTS = dict(
    n_routed_experts=64,
    n_shared_experts=2,
    moe_intermediate_size=1407,
    first_k_dense_replace=0,
    n_group=None,
    topk_group=None,
    routed_scaling_factor=1.0,
    q_lora_rank=1536,
)


def config(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v2",
        **mla_fields(raw, DEFAULTS),
        num_experts_per_tok=raw.get("num_experts_per_tok") or 6,
        norm_topk_prob=False,
        scoring_func="softmax",
        topk_method=raw.get("topk_method", "greedy"),
        rope_interleave=True,
    )


FAMILY = Family("deepseek_v2", "DeepseekV2ForCausalLM", config, shared_expert="shared_experts")
