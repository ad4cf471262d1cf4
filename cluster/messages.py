"""What crosses a process boundary through Ray, and the names of the deployments.

Ray pickles these dataclasses as they are, so the ingress, the routers and the shards share one
typed vocabulary (a renamed field is a type error, not a KeyError or a silent 0 at run time):

    request path
    ingress ──[GenerateRequest, ...]──▶ Router.submit
    ingress ◀──[RequestOutput | Refusal, ...] per engine step── Router.stream
    control plane
    ingress ◀──ModelInfo── Router.model_info            (/v1/models, readiness)
    ingress ◀──RouterStats── Router.stats               (/health, /metrics' gauges, `raymix scale`)
    ingress ◀──ExpertLoadSnapshot── Router.expert_load  (/metrics' expert series)
    ingress ◀──ExpertStatus── Router.expert_status      (the web page's expert view)
    ingress ◀──RebalanceResult── Router.rebalance       (EPLB on request)
    scale   ◀──ResizeResult── Router.resize             (`raymix scale`)
    router  ◀──ShardInfo── ExpertShard.info             (joining, health, the expert view)

The expert shards' per-layer tensors do not travel here: they go over the data plane
(moe.expert_parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe.engine.llm_engine import EngineStats
from moe.engine.sequence import RequestOutput
from moe.errors import RequestError
from moe.expert_parallel.load import ExpertLoadSnapshot
from moe.sampling import SamplingParams

APP_NAME = "raymix"  # the Serve application
INGRESS = "Ingress"
ROUTER = "Router"
EXPERT_SHARD = "ExpertShard"  # the deployment name inside an extra shard's own application


def router_deployment_name(i: int) -> str:
    """Router i: one deployment each (its own KV cache and batch), `Router` for the first."""
    return ROUTER if i == 0 else f"{ROUTER}{i}"


def shard_deployment_name(k: int) -> str:
    """The app's own shard k: one deployment each, since each holds different experts."""
    return f"{EXPERT_SHARD}{k}"


def extra_shard_app(k: int) -> str:
    """Shard k beyond the app's own (`raymix scale`): a small Serve application of its own."""
    return f"{APP_NAME}-shard{k}"


@dataclass(frozen=True)
class GenerateRequest:
    """One choice of an API request: the engine runs it as one sequence. A request resumed on
    another router after its router died carries the output tokens already sent to the client
    (`resumed_token_ids`: the new router continues after them), the characters of their text
    sent (`resumed_text_len`) and how many routers it has lost (`attempt`)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resumed_token_ids: list[int] = field(default_factory=list)
    resumed_text_len: int = 0
    attempt: int = 0


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
class RouterStatus:
    """One router as the ingress sees it (the expert view lists them)."""

    router: int
    ready: bool
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    prefix_cache_hit_rate: float | None  # prompt tokens found cached / looked up, since start


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
    routers: list[RouterStatus] = field(default_factory=list)  # token counts above: all of theirs


@dataclass(frozen=True)
class RouterStats:
    """A router's state: its engine's gauges and what it sees of its shards."""

    engine: EngineStats
    ready: bool  # the engine is up and the router not draining
    router: int = 0  # which router (of --routers)
    steps: int = 0  # engine steps since start
    step_seconds: float = 0.0  # their wall time
    expert_seconds: float = 0.0  # of that, dispatch + waiting for the shards + combine
    expert_shards: int = 0  # shards it routes to now
    base_shards: int = 0  # of those, the app's own (more come from `raymix scale`)
    shard_recoveries: int = 0  # shards replaced while serving
    shard_failovers: int = 0  # a dead shard's part of a layer taken by its experts' other holders, no wait
    shard_waits: int = 0  # steps that waited for a dead shard's replacement
    gpu_ids: list[str] = field(default_factory=list)  # the router's GPUs
    data_plane_transports: list[str | None] = field(default_factory=list)  # [shard] "gloo" | "nccl"
    gpu_memory: dict[str, dict[str, int]] = field(default_factory=dict)  # deployment -> {used, total}


@dataclass(frozen=True)
class ShardInfo:
    """An expert shard's answer to `info`: what it holds and read, where it runs, what it served."""

    shard_id: int
    expert_ids: list[int]  # held now (own experts and replicas)
    num_parameters: int
    nbytes: int
    tensors_read: int  # checkpoint tensors it read: only its own experts'
    experts_read: list[int]
    device: str
    gpu_ids: list[str]
    cuda_visible_devices: str | None
    node_id: str
    node_ip: str
    pid: int
    batches_served: int  # layer batches answered, every router's together
    routers: int = 0  # routers connected to its data plane


@dataclass(frozen=True)
class RebalanceResult:
    """What a rebalance (EPLB) did: the predicted balancedness (mean / max tokens per shard over
    the recent load) before and after, and the replicated experts with their shards."""

    changed: bool
    reason: str | None = None  # why nothing could be planned
    before: float | None = None
    after: float | None = None
    balancedness: float | None = None  # when the current placement is already the plan
    replicas: dict[str, list[int]] = field(default_factory=dict)  # expert -> its shards


@dataclass(frozen=True)
class PlacementSnapshot:
    """A router's placement, for a router that (re)starts beside it: it routes and gives a
    replaced shard back the same experts as the others, never its start-up split."""

    live: bool  # the router's engine is up: this is what it routes by
    plan: list[list[int]]  # [expert] the shards holding it
    num_shards: int
    held: list[list[int]]  # [shard] what it holds (primaries + replicas)
    primaries: list[list[int]]
    extra_apps: list[str]  # shard applications beyond the app's own (`raymix scale`)


@dataclass(frozen=True)
class ResizeResult:
    """The expert shards after a resize (`raymix scale`)."""

    expert_shards: int
    expert_groups: list[list[int]]  # shard k's own experts


__all__ = [
    "APP_NAME",
    "EXPERT_SHARD",
    "INGRESS",
    "ROUTER",
    "ExpertLoadSnapshot",
    "ExpertStatus",
    "GenerateRequest",
    "ModelInfo",
    "Output",
    "PlacementSnapshot",
    "RebalanceResult",
    "Refusal",
    "RequestOutput",
    "ResizeResult",
    "RouterStats",
    "RouterStatus",
    "ShardInfo",
    "ShardStatus",
    "extra_shard_app",
    "router_deployment_name",
    "shard_deployment_name",
]
