"""What crosses a process boundary on the request path, and the names of the deployments.

Ray pickles these dataclasses as they are, so the ingress and the router share one typed
vocabulary (a renamed field is a type error, not a KeyError at run time):

    ingress ──[GenerateRequest, ...]──▶ Router.submit
    ingress ◀──[RequestOutput | Refusal, ...] per engine step── Router.stream
    ingress ◀──ExpertStatus── Router.expert_status      (the web page's expert view)

The expert shards' per-layer tensors do not travel here: they go over the data plane
(moe.expert_parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.errors import RequestError
from moe.sampling import SamplingParams
from moe.sequence import RequestOutput

APP_NAME = "raymix"  # the Serve application
INGRESS = "Ingress"
ROUTER = "Router"
EXPERT_SHARD = "ExpertShard"  # the deployment name inside an extra shard's own application


def shard_deployment_name(k: int) -> str:
    """The app's own shard k: one deployment each, since each holds different experts."""
    return f"{EXPERT_SHARD}{k}"


def extra_shard_app(k: int) -> str:
    """Shard k beyond the app's own (`raymix scale`): a small Serve application of its own."""
    return f"{APP_NAME}-shard{k}"


@dataclass(frozen=True)
class GenerateRequest:
    """One choice of an API request: the engine runs it as one sequence."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Refusal:
    """A request the engine would not run (bad input, full queue) or could not finish
    (`server_error`: the engine step failed or is shutting down)."""

    request_id: str
    message: str
    param: str | None = None
    code: str | None = None
    server_error: bool = False

    @property
    def overloaded(self) -> bool:
        return self.code == "overloaded"

    @classmethod
    def from_exception(cls, request_id: str, e: BaseException) -> Refusal:
        if isinstance(e, RequestError):
            return cls(request_id, e.message, e.param, e.code)
        return cls(request_id, str(e), server_error=True)


Output = RequestOutput | Refusal


@dataclass(frozen=True)
class ModelInfo:
    """The router's answer to `model_info`: whether the engine is up, and its context length."""

    ready: bool
    max_model_len: int | None
    pid: int


@dataclass(frozen=True)
class ShardStatus:
    """One expert shard as the router sees it."""

    shard_id: int
    experts: list[int]  # the experts it computes now: its own, then replicas
    replicas: list[int]  # of those, the ones it computes as a replica (a hot expert's copy)
    healthy: bool  # it answered the router within the health timeout
    detail: str  # why not healthy ("" when it is)
    transport: str | None  # its data-plane link: "gloo" | "nccl" (None before it connected)
    dispatch_ms: list[float | None]  # [layer] mean round trip of a layer batch, recent window
    pid: int | None = None
    device: str | None = None


@dataclass(frozen=True)
class ExpertStatus:
    """Where the experts are and how the tokens spread over them: the router's own counters.
    The recent window is the last layer batches that rebalancing plans from (it starts over
    when the placement changes)."""

    ready: bool  # the engine is up and its shards connected
    num_layers: int
    num_experts: int
    num_redundant_experts: int  # spare expert slots for hot-expert replicas (0: no rebalancing)
    recent_expert_tokens: list[list[int]]  # [layer][expert] token assignments, recent window
    expert_tokens: list[list[int]]  # [layer][expert] token assignments since start
    balancedness: float  # mean / max tokens per shard over the recent window (1 = even)
    shard_recoveries: int  # shards replaced while serving
    shards: list[ShardStatus]


__all__ = [
    "APP_NAME",
    "EXPERT_SHARD",
    "INGRESS",
    "ROUTER",
    "ExpertStatus",
    "GenerateRequest",
    "ModelInfo",
    "Output",
    "Refusal",
    "RequestOutput",
    "ShardStatus",
    "extra_shard_app",
    "shard_deployment_name",
]
