"""POST /v1/completions: text (or token-id) prompts, several at once, JSON or SSE.

Choice k answers prompt k // n. `echo` puts the prompt in front of the answer, and with
`logprobs` the prompt's tokens' logprobs in front of the answer's (the first token's null), as
OpenAI's legacy completions and vLLM do: what lm-eval's log-likelihood tasks read. `max_tokens:
0` with both scores the prompt alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from api.access_log import request_id
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
        given = req.prompts()
        cap = ctx.settings.max_num_seqs  # choices of one request: at most one running batch
        if len(given) * req.n > cap:
            raise APIError.bad_request(
                f"{len(given)} prompts x n={req.n} is {len(given) * req.n} choices; at most {cap} "
                "(--max-num-seqs) per request",
                "prompt" if len(given) > 1 else "n",
            )
        # tokenized off the event loop: a large prompt takes seconds, and other streams go on
        size = sum(len(p) for p in given if isinstance(p, str))
        prompts = await ctx.off_loop(
            size, lambda: [p if isinstance(p, list) else ctx.tokenizer.encode(p) for p in given]
        )
        vocab = ctx.tokenizer.vocab_size  # as vLLM: an id the tokenizer cannot decode is refused
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError.bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(prompts) > 1 and req.stream:
            raise APIError.bad_request("Streaming takes a single prompt.", "prompt")
        rid = f"cmpl-{request_id()}"  # X-Request-Id when the client sent one
        created = int(time.time())
        per_choice = [p for p in prompts for _ in range(req.n)]  # choice k: prompt k // n
        prompt_tokens = sum(len(p) for p in prompts)
        scored = req.logprobs if req.echo else None  # k for the prompt's tokens
        choices = await start_choices(
            ctx,
            rid,
            per_choice,
            prompt_tokens,
            req,
            req.max_tokens,
            req.logprobs,
            None,
            req.stream,
            scored,
            prompt_param="prompt",
        )
        if req.stream:
            return sse_response(self._stream(choices, rid, model, created, req, per_choice))
        results = await choices.collect()
        out = []
        for i, r in enumerate(results):
            echoed = ctx.tokenizer.decode(per_choice[i]) if req.echo else ""
            lps: list[Logprobs | None] = [*(r.prompt_logprobs or []), *r.logprobs]
            logprobs = self._logprobs(lps, per_choice[i]) if req.logprobs is not None else None
            out.append(
                CompletionChoice(
                    index=i, text=echoed + r.text, logprobs=logprobs, finish_reason=r.finish_reason
                )
            )
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
        req: CompletionRequest,
        prompts: list[list[int]],
    ) -> AsyncIterator[str]:
        include_usage = req.include_usage()
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        offsets = [0] * len(prompts)  # text_offset of each choice's next token
        started = [False] * len(prompts)
        async for i, out in choices:
            echoed, lps = "", list[Logprobs | None](out.new_logprobs)
            if req.echo and not started[i]:  # a choice's first chunk carries the prompt
                echoed = self.ctx.tokenizer.decode(prompts[i])
                lps = [*(out.prompt_logprobs or []), *lps]
            started[i] = True
            if out.new_text or echoed or out.finished:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._logprobs(lps, prompts[i], offsets[i])
                    offsets[i] += sum(len(t) for t in logprobs.tokens)
                choice = CompletionChoice(
                    index=i,
                    text=echoed + out.new_text,
                    logprobs=logprobs,
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

    def _logprobs(self, lps: list[Logprobs | None], prompt: list[int], offset: int = 0) -> CompletionLogprobs:
        """OpenAI's logprobs of `lps`; a None entry (the echoed prompt's first token) is the
        first token of `prompt`. Each top_logprobs holds the k most likely and the token itself."""
        text = self.ctx.tokenizer.token_text
        tokens, values, tops, offsets = [], [], [], []
        for j, lp in enumerate(lps):
            token = text(prompt[j] if lp is None else lp.token_id)
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {text(t): v for t, v in [*lp.top, (lp.token_id, lp.logprob)]})
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
        )
