"""The model families raymix serves, one declarative module each, and the one model they share.

`family_of(config.json)` finds a checkpoint's family by its `model_type`; an unknown one is refused
in one line naming those supported. Each family module only says what differs (moe.models.family);
`transformer.py` is the one layer loop for all of them.
"""

from __future__ import annotations

from typing import Any

from moe.errors import CheckpointError
from moe.models import deepseek_v2, deepseek_v3, mistral, mixtral, olmoe, qwen2_moe, qwen3_moe
from moe.models.family import Family

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        mixtral.FAMILY,
        mistral.FAMILY,
        qwen3_moe.FAMILY,
        qwen2_moe.FAMILY,
        olmoe.FAMILY,
        deepseek_v3.FAMILY,
        deepseek_v2.FAMILY,
    )
}


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def family_of(raw: dict[str, Any]) -> Family:
    """The family of a config.json (Mixtral's when it names none, as the first Hub files)."""
    return family(raw.get("model_type", "mixtral"))
