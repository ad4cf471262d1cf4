"""The model's architecture as one frozen dataclass: every field the engine and the shards need,
whatever the family.

A family (moe.models: Mixtral, dense Mistral, Qwen3-MoE, Qwen2-MoE, OLMoE) maps its Hugging Face
`config.json` onto these fields; nothing below the families branches on `model_type`. What
differs between them is said by fields, with Mixtral's values as defaults:
- attention: `qkv_bias`, `o_bias`, `qk_norm` ("head": RMSNorm per head before RoPE, Qwen3's;
  "proj": over the whole q and k projections, OLMoE's), `clip_qkv`, `head_dim`, `sliding_window`;
- the experts' router: softmax over all experts (float32), top `num_experts_per_tok`, renormalised
  when `norm_topk_prob`;
- which layers have experts (`moe_layers`, from `mlp_only_layers` and `decoder_sparse_step`);
  the others, and every layer of a dense model (`num_local_experts` 0), have an MLP of
  `intermediate_size` on the router. The experts' own width is `moe_intermediate_size`;
- a shared expert of `shared_expert_intermediate_size` with a sigmoid gate (Qwen2-MoE), on the
  router too.
`ModelConfig.from_pretrained` reads a checkpoint's config through its family; an unknown
`model_type` is refused in one line naming the supported ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe.errors import CheckpointError


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
    shared_expert_intermediate_size: int = 0  # a shared expert with a sigmoid gate (Qwen2-MoE)
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


def rope_theta(raw: dict[str, Any], default: float) -> float:
    """The rotary base: `rope_theta` at the top level (the Hub's files) or in `rope_parameters`
    (transformers 5); only the default RoPE is supported."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        kind = rope.get("rope_type", rope.get("type"))
        raise CheckpointError(f"rope_type {kind!r} is not supported (only the default RoPE)")
    if "rope_theta" in raw:
        return float(raw["rope_theta"])
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return default


def common_fields(raw: dict[str, Any], rope_default: float, eps_default: float) -> dict[str, Any]:
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
    out["rope_theta"] = rope_theta(raw, rope_default)
    out["torch_dtype"] = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16").removeprefix("torch.")
    out["architecture"] = (raw.get("architectures") or [""])[0]
    return out
