"""POST /production/predict (and /predict): Baseten's REST API.

`{"output": ...}` is the conversation as the model saw it, then the answer; with `stream` the
answer's text goes out as plain chunks (plain text has no error event: an error mid-way is
logged and ends the stream).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.access_log import request_id
from api.context import ServingContext
from api.errors import APIError, EngineUnavailable
from api.protocol import PredictRequest, PredictResponse, template_messages
from api.streaming import ChoiceStream, start_choices

log = logging.getLogger("ray.serve")


class ServingPredict:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: PredictRequest) -> Response:
        ctx = self.ctx
        ctx.model_name(req.model)
        prompt = ctx.tokenizer.apply_chat_template(template_messages(req.messages))
        max_tokens = await ctx.max_tokens(req.max_new_tokens, len(prompt))
        rid = f"predict-{request_id()}"  # X-Request-Id when the client sent one
        choices = await start_choices(
            ctx, rid, [prompt], len(prompt), req, max_tokens, None, None, req.stream
        )
        if req.stream:
            return StreamingResponse(self._plain_text(choices), media_type="text/plain")
        (result,) = await choices.collect()
        output = ctx.tokenizer.decode(prompt, skip_special_tokens=False) + result.text
        return JSONResponse(PredictResponse(output=output).body())

    async def _plain_text(self, choices: ChoiceStream) -> AsyncIterator[str]:
        try:
            async for _, out in choices:
                if out.new_text:
                    yield out.new_text
        except (APIError, EngineUnavailable) as e:
            log.warning("predict stream ended early: %s", e)
