"""DeepSeek-V3 (V3, V3.1, R1, Kimi-K2, Moonlight): multi-head latent attention with a q
down-projection (`q_lora_rank`), interleaved rotary pairs and YaRN; 256 experts top-8 chosen by a
sigmoid with a correction bias, within the 4 best of 8 groups, the weights renormalised and scaled
by `routed_scaling_factor`; one shared expert, and dense MLPs in the first `first_k_dense_replace`
layers. The multi-token-prediction layer the Hub's checkpoints carry past the last layer
(`num_nextn_predict_layers`) is not read, as transformers does not."""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, common_fields, yarn_of
from moe.errors import CheckpointError
from moe.models.family import Family

# transformers' DeepseekV3Config defaults, for what a config.json leaves out
DEFAULTS = dict(
    n_routed_experts=256,
    n_shared_experts=1,
    moe_intermediate_size=2048,
    first_k_dense_replace=3,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    q_lora_rank=1536,
)


def mla_fields(raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """What DeepSeek-V2 and V3 spell alike: MLA, the experts' sizes, the shared experts, the dense
    first layers (`defaults`: the family's config class's, for what config.json leaves out)."""
    heads = raw["num_attention_heads"]
    if raw.get("num_key_value_heads") not in (None, heads):
        raise CheckpointError("multi-head latent attention needs num_key_value_heads == num_attention_heads")
    fields = common_fields(raw, rope_default=1e4, eps_default=1e-6, yarn=True)
    fields.pop("head_dim", None)  # transformers sets it to qk_rope_head_dim; MLA's own fields say it all
    bias = bool(raw.get("attention_bias", False))
    n_shared = raw.get("n_shared_experts", defaults["n_shared_experts"]) or 0
    moe_width = raw.get("moe_intermediate_size", defaults["moe_intermediate_size"])
    return dict(
        **fields,
        num_local_experts=raw.get(
            "n_routed_experts", raw.get("num_local_experts", defaults["n_routed_experts"])
        ),
        moe_intermediate_size=moe_width,
        shared_expert_intermediate_size=moe_width * n_shared,
        shared_expert_gate=False,
        mlp_only_layers=tuple(range(raw.get("first_k_dense_replace", defaults["first_k_dense_replace"]))),
        n_group=raw.get("n_group", defaults["n_group"]) or 1,
        topk_group=raw.get("topk_group", defaults["topk_group"]) or 1,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", defaults["routed_scaling_factor"])),
        router_float32=True,  # transformers' DeepSeek classes keep the router in float32
        kv_lora_rank=raw.get("kv_lora_rank", 512),
        q_lora_rank=raw.get("q_lora_rank", defaults["q_lora_rank"]),
        qk_nope_head_dim=raw.get("qk_nope_head_dim", 128),
        qk_rope_head_dim=raw.get("qk_rope_head_dim", 64),
        v_head_dim=raw.get("v_head_dim", 128),
        yarn=yarn_of(raw),
        qkv_bias=bias,  # q_a_proj's and kv_a_proj_with_mqa's
        o_bias=bias,
        num_nextn_predict_layers=raw.get("num_nextn_predict_layers", 0),
    )


def config(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v3",
        **mla_fields(raw, DEFAULTS),
        num_experts_per_tok=raw.get("num_experts_per_tok", 8),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        scoring_func="sigmoid",  # transformers' DeepseekV3 ignores scoring_func and topk_method
        topk_method="noaux_tc",
        rope_interleave=bool(raw.get("rope_interleave", True)),
    )


FAMILY = Family("deepseek_v3", "DeepseekV3ForCausalLM", config, shared_expert="shared_experts")
