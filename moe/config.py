"""Model configuration read from a Hugging Face `config.json`: Mixtral (`model_type: mixtral`)
or the dense Mistral (`model_type: mistral`).

One frozen dataclass with every field the model needs. A dense Mistral is the same architecture
with one MLP per layer where Mixtral has experts: raymix holds it as a Mixtral with one expert
that every token goes to with weight 1 (`num_local_experts` 1, no gate), computed on the router.
Both spellings of the rotary base are accepted: `rope_theta` at the top level (the Hub files)
and `rope_parameters.rope_theta` (what transformers 5 writes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe.errors import CheckpointError

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "mixtral"  # or "mistral": dense, one MLP per layer
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.model_type == "mistral":  # its MLP is one expert that every token goes to
            object.__setattr__(self, "num_local_experts", 1)
            object.__setattr__(self, "num_experts_per_tok", 1)

    @property
    def is_moe(self) -> bool:
        """Mixtral: experts behind a gate; False for the dense Mistral (its MLP is one expert)."""
        return self.model_type == "mixtral"

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        fields = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in raw.items() if k in fields}
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if "rope_theta" not in values and isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
            raise CheckpointError(f"rope_type {rope['rope_type']!r} is not supported (only the default RoPE)")
        if "dtype" in raw and "torch_dtype" not in raw:
            values["torch_dtype"] = raw["dtype"]
        if values.get("hidden_act", "silu") != "silu":
            raise CheckpointError(
                f"hidden_act {values['hidden_act']!r} is not supported (Mistral and Mixtral use silu)"
            )
        return cls(**values)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in the model directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if raw.get("model_type", "mixtral") not in ARCHITECTURES:
            raise CheckpointError(
                f"{path}: model_type {raw.get('model_type')!r} is not supported "
                f"(supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        try:
            return cls.from_dict(raw)
        except TypeError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a Hugging Face Mixtral (or Mistral) checkpoint carries."""
        d = asdict(self)
        d.update(architectures=[ARCHITECTURES[self.model_type]], attention_dropout=0.0)
        if not self.is_moe:
            del d["num_local_experts"], d["num_experts_per_tok"]
        if d["head_dim"] is None:
            del d["head_dim"]
        return d
