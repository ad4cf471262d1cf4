"""ServingContext: what every endpoint family shares (settings, tokenizer, engine, metrics).

One per app, built by whoever hosts the API (the ingress deployment, or a test with an
in-process engine) and handed to `api.app.build_api`; no module-level state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

from api import access_log
from api.engine_client import EngineClient
from api.errors import APIError, EngineUnavailable
from api.metrics import ServingMetrics
from api.protocol import ChatMessage, UsageInfo
from cluster.config import RaymixSettings
from moe.checkpoint.quantization import QuantizationConfig
from moe.checkpoint.reader import checkpoint_revision
from moe.errors import CheckpointError
from moe.tokenizer import Tokenizer

T = TypeVar("T")
LARGE_INPUT_BYTES = 256 * 1024  # a request body past this is tokenized one at a time


def text_size(messages: list[ChatMessage]) -> int:
    """Characters of a conversation's messages (what its template and tokenizer go through)."""
    return sum(len(m.text()) for m in messages)


@dataclass
class ServingContext:
    settings: RaymixSettings
    engine: EngineClient
    tokenizer: Tokenizer
    defaults: dict[str, Any]  # generation defaults (moe.engine.generation): the checkpoint's, overridden
    metrics: ServingMetrics
    max_model_len: int | None = None  # learned from the engine on first use

    @cached_property
    def revision(self) -> str | None:
        """The served checkpoint's content hash (None when its directory is not readable here)."""
        try:
            return checkpoint_revision(self.settings.model_dir())
        except OSError:
            return None

    @cached_property
    def quantization(self) -> str | None:
        """How the weights are held: "fp8" (an FP8 checkpoint, or --quantization fp8), None: as stored."""
        try:
            quant = QuantizationConfig.from_pretrained(self.settings.model_dir(), self.settings.quantization)
        except CheckpointError:  # the engine refused it: nothing is served anyway
            return None
        return quant.name if quant else None

    @cached_property
    def _large_inputs(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(1)

    async def off_loop(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a worker thread, off the event loop (tokenizing, chat templates). Inputs
        over LARGE_INPUT_BYTES go one at a time: a tokenizer holds the GIL in stretches, and
        several megabytes tokenized at once would starve the loop that streams the others."""
        if size <= LARGE_INPUT_BYTES:
            return await asyncio.to_thread(fn, *args)
        async with self._large_inputs:
            return await asyncio.to_thread(fn, *args)

    @cached_property
    def names(self) -> list[str]:
        """Served model names, the main one first."""
        return self.settings.model_names()

    def model_name(self, requested: str | None) -> str:
        """The served name a request asks for (none: the main one), or 404."""
        if requested is None or requested in self.names:
            record = access_log.current()
            if record is not None:
                record.model = requested or self.names[0]
            return requested or self.names[0]
        raise APIError(
            404,
            f"The model `{requested}` does not exist.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    async def context_len(self) -> int:
        if self.max_model_len is None:
            try:
                info = await asyncio.wait_for(self.engine.model_info(), timeout=30)
            except Exception as e:
                raise EngineUnavailable(str(e) or type(e).__name__) from None
            if not info.ready or info.max_model_len is None:
                raise APIError.unavailable("The model is still loading.")
            self.max_model_len = info.max_model_len
        return self.max_model_len

    async def max_tokens(self, requested: int | None, prompt_len: int) -> int:
        """The request's max tokens, else the checkpoint's max_new_tokens, else up to the context."""
        if requested is not None:
            return requested
        room = max(1, await self.context_len() - prompt_len)
        return min(room, int(self.defaults.get("max_new_tokens", room)))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        """OpenAI's usage, plus DeepInfra's estimated_cost when prices are configured."""
        s = self.settings
        cost = None
        if s.input_price_per_million is not None or s.output_price_per_million is not None:
            cost = prompt_tokens * (s.input_price_per_million or 0.0)
            cost += completion_tokens * (s.output_price_per_million or 0.0)
            cost /= 1e6
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            estimated_cost=cost,
        )
