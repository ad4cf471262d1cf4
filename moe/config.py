"""The model's architecture as one frozen dataclass: every field the engine and the shards need,
whatever the family.

A family (moe.models: Mixtral, dense Mistral, Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V2/V3) maps its Hugging Face
`config.json` onto these fields; nothing below the families branches on `model_type`. What
differs between them is said by fields, with Mixtral's values as defaults:
- attention: `qkv_bias`, `o_bias`, `qk_norm` ("head": RMSNorm per head before RoPE, Qwen3's;
  "proj": over the whole q and k projections, OLMoE's), `clip_qkv`, `head_dim`, `sliding_window`;
- the experts' router: softmax over all experts (float32), top `num_experts_per_tok`, renormalised
  when `norm_topk_prob`;
- which layers have experts (`moe_layers`, from `mlp_only_layers` and `decoder_sparse_step`);
  the others, and every layer of a dense model (`num_local_experts` 0), have an MLP of
  `intermediate_size` on the router. The experts' own width is `moe_intermediate_size`;
- a shared expert of `shared_expert_intermediate_size`, with a sigmoid gate (Qwen2-MoE) or
  without (`shared_expert_gate` false: DeepSeek's shared experts), on the router too;
- multi-head latent attention (`kv_lora_rank` > 0, DeepSeek-V2/V3): the q/kv down- and
  up-projections, the rotary part of `qk_rope_head_dim` apart (`rope_interleave`), YaRN
  (`yarn`), and a KV cache of one latent per token (`kv_cache_dims`);
- the router's scores (`scoring_func` softmax or sigmoid), `topk_method` (greedy, DeepSeek-V2's
  group-limited greedy, DeepSeek-V3's noaux_tc with `e_score_correction_bias` and groups scored
  by their top two), `n_group` / `topk_group`, `routed_scaling_factor`.
`ModelConfig.from_pretrained` reads a checkpoint's config through its family; an unknown
`model_type` is refused in one line naming the supported ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe.errors import CheckpointError


@dataclass(frozen=True)
class Yarn:
    """YaRN rope scaling (DeepSeek-V2/V3's published configs), as transformers computes it."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    @staticmethod
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (transformers' `attention_factor`)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.get_mscale(self.factor, self.mscale) / self.get_mscale(
                self.factor, self.mscale_all_dim
            )
        return self.get_mscale(self.factor)

    def correction_range(self, dim: int, base: float) -> tuple[float, float]:
        """The frequency indices between which YaRN ramps from extrapolating (the fast, high
        frequencies, below `low`) to interpolating by `factor` (the slow ones, above `high`)."""

        def corr_dim(rotations: float) -> float:
            turns = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return dim * math.log(turns) / (2 * math.log(base))

        low, high = corr_dim(self.beta_fast), corr_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        return low, high


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "mixtral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # a dense MLP's width (Mixtral: the experts')
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    num_local_experts: int = 8  # routed experts per MoE layer; 0: a dense model
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # an expert's width; None: intermediate_size
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # a shared expert on the router (Qwen2-MoE, DeepSeek)
    shared_expert_gate: bool = True  # the shared expert's output scaled by a sigmoid gate (Qwen2-MoE)
    scoring_func: str = "softmax"  # the router's scores: "softmax" or "sigmoid" (DeepSeek-V3)
    topk_method: str = "greedy"  # "greedy", "group_limited_greedy" (DeepSeek-V2), "noaux_tc" (V3)
    n_group: int = 1  # expert groups (group-limited routing)
    topk_group: int = 1  # groups a token's experts may come from
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by this
    router_float32: bool = False  # the gate and its correction bias in float32 (DeepSeek)
    kv_lora_rank: int = 0  # multi-head latent attention's latent width (0: GQA attention)
    q_lora_rank: int | None = None  # MLA's q down-projection width (None: one q projection)
    qk_nope_head_dim: int = 0  # MLA: a head's q/k width without rotary
    qk_rope_head_dim: int = 0  # MLA: a head's rotary q/k width (one rotary key shared by all heads)
    v_head_dim: int = 0  # MLA: a head's value width
    rope_interleave: bool = False  # MLA's rotary pairs are interleaved (2i, 2i+1), not split halves
    yarn: Yarn | None = None  # YaRN rope scaling (None: the default rope)
    num_nextn_predict_layers: int = 0  # DeepSeek-V3's multi-token-prediction layers: not read
    mlp_only_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of experts
    decoder_sparse_step: int = 1  # experts in layers l with (l + 1) % step == 0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # "head" (per head, Qwen3) or "proj" (whole projection, OLMoE)
    clip_qkv: float | None = None  # q, k, v clamped to ±clip_qkv after the q/k norm (OLMoE)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str = "bfloat16"
    architecture: str = field(default="MixtralForCausalLM", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.qk_norm not in (None, "head", "proj"):
            raise CheckpointError(f"qk_norm must be 'head' or 'proj', not {self.qk_norm!r}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise CheckpointError(f"scoring_func {self.scoring_func!r} is not supported (softmax, sigmoid)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise CheckpointError(
                f"topk_method {self.topk_method!r} is not supported (greedy, group_limited_greedy, noaux_tc)"
            )
        if self.topk_method != "greedy" and (
            self.n_group < 1
            or self.num_local_experts % self.n_group
            or not 1 <= self.topk_group <= self.n_group
        ):
            raise CheckpointError(
                f"n_group {self.n_group} and topk_group {self.topk_group} do not split "
                f"{self.num_local_experts} experts into groups"
            )

    @property
    def is_moe(self) -> bool:
        """Whether any layer has experts (False for a dense model: everything on the router)."""
        return bool(self.moe_layers)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The layers with experts, in order; the experts' layer index is the position in this."""
        if self.num_local_experts == 0:
            return ()
        step, dense = self.decoder_sparse_step, set(self.mlp_only_layers)
        return tuple(
            i for i in range(self.num_hidden_layers) if i not in dense and (step <= 1 or (i + 1) % step == 0)
        )

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3): a latent KV cache."""
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """The width the rotary embedding turns: MLA's rotary part, else a whole head."""
        return self.qk_rope_head_dim if self.is_mla else self.attn_head_dim

    @property
    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(heads, key width, value width) of a token's KV cache entry per layer. MLA caches one
        latent per token, the compressed KV and the rotary key (kv_lora_rank + qk_rope_head_dim
        values), its first kv_lora_rank also the values: 576 for DeepSeek-V3, not 128 x 320."""
        if self.is_mla:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, self.kv_lora_rank
        return self.num_key_value_heads, self.attn_head_dim, self.attn_head_dim

    @property
    def kv_values_per_token(self) -> int:
        """Values a token holds in the KV cache per layer (K and V; MLA's values are its keys')."""
        heads, k, v = self.kv_cache_dims
        return heads * k if self.is_mla else heads * (k + v)

    @property
    def softmax_scale(self) -> float:
        """Attention's scale: 1/sqrt(q·k width); with MLA and YaRN, times mscale(factor)²."""
        if not self.is_mla:
            return self.attn_head_dim**-0.5
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = Yarn.get_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """A checkpoint's config.json, read by its family (moe.models)."""
        from moe.models import family_of

        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in the model directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        try:
            return family_of(raw).config(raw)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None


def rope_theta(raw: dict[str, Any], default: float, yarn: bool = False) -> float:
    """The rotary base: `rope_theta` at the top level (the Hub's files) or in `rope_parameters`
    (transformers 5); only the default RoPE is supported (and YaRN where the family has it)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kinds = ("default", None, "yarn") if yarn else ("default", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in kinds:
        kind = rope.get("rope_type", rope.get("type"))
        supported = "the default RoPE and YaRN" if yarn else "only the default RoPE"
        raise CheckpointError(f"rope_type {kind!r} is not supported ({supported})")
    if "rope_theta" in raw:
        return float(raw["rope_theta"])
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return default


def common_fields(
    raw: dict[str, Any], rope_default: float, eps_default: float, yarn: bool = False
) -> dict[str, Any]:
    """The fields every family spells alike, with its defaults for what its config omits."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported (the families served use silu)")
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "head_dim",
    )
    out: dict[str, Any] = {k: raw[k] for k in keys if k in raw}
    out["num_key_value_heads"] = raw.get("num_key_value_heads") or raw["num_attention_heads"]
    out["rms_norm_eps"] = raw.get("rms_norm_eps", eps_default)
    out["rope_theta"] = rope_theta(raw, rope_default, yarn)
    out["torch_dtype"] = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16").removeprefix("torch.")
    out["architecture"] = (raw.get("architectures") or [""])[0]
    return out


def yarn_of(raw: dict[str, Any]) -> Yarn | None:
    """YaRN's parameters from `rope_parameters` (transformers 5) or `rope_scaling` (the Hub's
    files), or None for the default rope."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "yarn":
        return None
    original = rope.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    if original is None:
        raise CheckpointError(
            "YaRN rope scaling without original_max_position_embeddings or max_position_embeddings"
        )
    factor = rope.get("factor") or raw["max_position_embeddings"] / original
    return Yarn(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(rope.get("mscale") or 0.0),
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        attention_factor=rope.get("attention_factor"),
        truncate=bool(rope.get("truncate", True)),
    )
