"""POST /v1/completions: text (or token-id) prompts, several at once, JSON or SSE.

Choice k answers prompt k // n. `echo` puts the prompt's text in front of the answer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from api.context import ServingContext
from api.errors import APIError
from api.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from api.streaming import ChoiceStream, sse_response, start_choices
from moe.sampling import Logprobs


class ServingCompletion:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: CompletionRequest) -> Response:
        ctx = self.ctx
        model = ctx.model_name(req.model)
        prompts = [p if isinstance(p, list) else ctx.tokenizer.encode(p) for p in req.prompts()]
        if len(prompts) > 1 and req.stream:
            raise APIError.bad_request("Streaming takes a single prompt.", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        per_choice = [p for p in prompts for _ in range(req.n)]  # choice k: prompt k // n
        prompt_tokens = sum(len(p) for p in prompts)
        choices = await start_choices(
            ctx, rid, per_choice, prompt_tokens, req, req.max_tokens, req.logprobs, None, req.stream
        )
        if req.stream:
            return sse_response(self._stream(choices, rid, model, created, req.include_usage(), req.logprobs))
        results = await choices.collect()
        out = [
            CompletionChoice(
                index=i,
                text=(ctx.tokenizer.decode(per_choice[i]) if req.echo else "") + r.text,
                logprobs=self._logprobs(r.logprobs) if req.logprobs is not None else None,
                finish_reason=r.finish_reason,
            )
            for i, r in enumerate(results)
        ]
        usage = ctx.usage(prompt_tokens, choices.completion_tokens)
        return JSONResponse(
            CompletionResponse(id=rid, created=created, model=model, choices=out, usage=usage).body()
        )

    async def _stream(
        self,
        choices: ChoiceStream,
        rid: str,
        model: str,
        created: int,
        include_usage: bool,
        logprobs: int | None,
    ) -> AsyncIterator[str]:
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        async for i, out in choices:
            if out.new_text or out.finished:
                choice = CompletionChoice(
                    index=i,
                    text=out.new_text,
                    logprobs=self._logprobs(out.new_logprobs) if logprobs is not None else None,
                    finish_reason=out.finish_reason if out.finished else None,
                )
                chunk = CompletionChunk(id=rid, created=created, model=model, choices=[choice], **extra)
                yield json.dumps(chunk.body())
        if include_usage:
            usage = self.ctx.usage(choices.prompt_tokens, choices.completion_tokens)
            yield json.dumps(
                CompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage).body()
            )
        yield "[DONE]"

    def _logprobs(self, lps: list[Logprobs]) -> CompletionLogprobs:
        text = self.ctx.tokenizer.token_text
        return CompletionLogprobs(
            tokens=[text(lp.token_id) for lp in lps],
            token_logprobs=[lp.logprob for lp in lps],
            top_logprobs=[{text(t): v for t, v in lp.top} for lp in lps],
        )
