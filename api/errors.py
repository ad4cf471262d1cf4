"""APIError: an OpenAI-shaped error answer (status, body, headers), raised anywhere in the API.

The app's exception handlers turn it, and the errors of the layers below (a bad request, the
engine gone), into `{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

from typing import Any

from api.protocol import error_body
from cluster.messages import Refusal
from moe.errors import RequestError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body: dict[str, Any] = error_body(message, type_, param, code)

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, "invalid_request_error", param, code)

    @classmethod
    def from_request_error(cls, e: RequestError) -> APIError:
        return cls.bad_request(e.message, e.param, e.code)

    @classmethod
    def unavailable(cls, message: str) -> APIError:
        return cls(503, message, "service_unavailable")

    @classmethod
    def from_refusal(
        cls, r: Refusal, overload_status: int, retry_after_s: int, prompt_param: str = "prompt"
    ) -> APIError:
        """The engine's refusal of a request, as the client should see it; what the engine calls
        the prompt is named as the request names it (`prompt_param`: messages, prompt, input)."""
        if r.server_error:
            return cls.unavailable(r.message)
        if r.overloaded:
            headers = {"Retry-After": str(retry_after_s)}
            return cls(overload_status, r.message, "rate_limit_error", None, "overloaded", headers)
        return cls.bad_request(r.message, prompt_param if r.param == "prompt" else r.param, r.code)


class EngineUnavailable(RuntimeError):
    """The engine host cannot be reached (restarting, gone): 503, or an error event mid-stream."""
