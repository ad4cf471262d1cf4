"""Generation defaults: what a request gets for the sampling parameters it leaves out.

As vLLM's `--generation-config auto`: the checkpoint's `generation_config.json` (temperature,
top_p, top_k, min_p, repetition_penalty, max_new_tokens), then the operator's overrides; a
request's own values win over both. Without any of them, OpenAI's defaults apply (temperature
1, top_p 1, no top_k/min_p/repetition penalty, max tokens up to the context length).
"""

from __future__ import annotations

import json
from pathlib import Path

from moe.errors import CheckpointError

GENERATION_KEYS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens"}
)


def generation_defaults(
    model_dir: str | Path, mode: str = "auto", overrides: dict[str, float | int] | None = None
) -> dict[str, float | int]:
    defaults: dict[str, float | int] = {}
    path = Path(model_dir) / "generation_config.json"
    if mode == "auto" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        defaults = {k: v for k, v in data.items() if k in GENERATION_KEYS and isinstance(v, int | float)}
    return defaults | dict(overrides or {})


def generation_eos_ids(model_dir: str | Path | None) -> list[int]:
    """The eos ids of `generation_config.json` (one or a list: Qwen3 stops on <|im_end|> and
    <|endoftext|>), which transformers' generate and vLLM stop on besides config.json's."""
    path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    return [eos] if isinstance(eos, int) else [int(t) for t in eos or []]
