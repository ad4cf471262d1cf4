"""What a model family declares: how its config.json maps onto ModelConfig and how its
checkpoint names the experts. One small module per family (moe/models/<family>.py) fills one in;
the layer loop (moe.models.transformer), the checkpoint reader and the shards read only this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe.config import ModelConfig

GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")  # an expert's projections, as transformers names them


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's `model_type`
    architecture: str  # transformers' class: the reference the tests compare against
    config: Callable[[dict[str, Any]], ModelConfig]  # config.json → ModelConfig
    moe_block: str = "mlp"  # a layer's gate and experts: model.layers.{l}.{moe_block}.gate / .experts.{e}
    # an expert's (gate, up, down) projections: the names its checkpoints use, the first as written
    expert_names: tuple[tuple[str, str, str], ...] = (GATE_UP_DOWN,)
    shared_expert: str = "shared_expert"  # a layer's shared expert: model.layers.{l}.mlp.{shared_expert}
