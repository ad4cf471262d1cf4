"""The one configuration object: every setting of a raymix deployment, with its bounds.

CLI flags (`raymix serve --expert-shards 4`), environment variables (`RAYMIX_EXPERT_SHARDS=4`)
and a YAML file (`--config raymix.yaml`, keys as the field names) all come from `RaymixSettings`;
a KubeRay serveConfigV2 passes the same keys as `args` to `deployments.app:build_app`.
Precedence: CLI over environment over YAML over defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from moe.engine.generation import GENERATION_KEYS
from moe.engine.llm_engine import EngineConfig


class RaymixSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAYMIX_", extra="forbid", validate_default=True)

    model: str | None = Field(
        default=None,
        description="Checkpoint directory in the Hugging Face Mixtral format (default: the embedded tiny model)",
    )
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Name(s) the API serves the model under; the first is the main one (default: the directory name)",
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API")
    address: str | None = Field(
        default=None,
        description="Ray cluster to join (e.g. 'auto' or ray://host:10001); default: start a local one",
    )
    expert_shards: int = Field(
        default=2,
        ge=0,
        le=256,
        description="Number of expert-shard deployments the experts are split over; 0: the experts in the router's "
        "own process (one box, no data plane: the fastest on a CPU)",
    )
    routers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Number of router deployments (each its own process and GPU, with its own KV cache and batch), "
        "all sharing the expert shards; the ingress sends a request to the router that has its prompt's prefix "
        "cached, else to the least loaded",
    )
    max_ingress_replicas: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Most ingress (HTTP API) replicas; above 1, Serve autoscales them from 1 by requests in flight",
    )
    # keys: from the environment (RAYMIX_API_KEY, comma-separated) or a file (a mounted Secret),
    # rather than a command line `ps` shows; never printed (repr=False)
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False, description="Accepted API key(s) (Bearer); none: no authentication"
    )
    api_key_file: str | None = Field(
        default=None,
        description="A file of accepted API keys, one per line (a mounted Secret), added to api_key",
    )
    admin_api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Key(s) for /experts/rebalance, apart from the users' keys (none: a user's key does)",
    )
    admin_api_key_file: str | None = Field(
        default=None, description="A file of admin API keys, one per line, added to admin_api_key"
    )
    max_num_seqs: int = Field(
        default=64, ge=1, le=4096, description="Most sequences in the running batch at once"
    )
    max_num_batched_tokens: int = Field(
        default=2048,
        ge=16,
        le=1_000_000,
        description="Most tokens in one engine step (longer prompts are prefilled in chunks)",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Context length (prompt + output); default: the model's, bounded by the KV cache",
    )
    max_queued_requests: int = Field(
        default=256,
        ge=0,
        le=1_000_000,
        description="Requests allowed to wait beyond the running batch; more get 429",
    )
    overload_status: Literal[429, 503] = Field(
        default=429,
        description="HTTP status for requests refused because the queue is full (with Retry-After)",
    )
    retry_after_s: int = Field(
        default=1, ge=0, le=3600, description="Retry-After seconds sent with an overload refusal"
    )
    request_timeout_s: float | None = Field(
        default=600.0,
        gt=0,
        description="A request still running after this long is aborted (408); none: no limit",
    )
    block_size: int = Field(default=16, ge=1, le=256, description="Tokens per KV-cache block")
    kv_cache_memory_mb: int | None = Field(
        default=None,
        ge=1,
        description="Memory for the router's KV cache, in MiB; default: from the device (GPU: what "
        "--gpu-memory-utilization leaves; CPU: 512, or a tenth of the free memory if less)",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Fraction of the router's GPU its weights, activations, graphs and KV cache may use in all "
        "(counting what other processes on the GPU hold); the KV cache takes the rest (vLLM's meaning)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Compute dtype; auto: float32 on CPU, the checkpoint's on GPU"
    )
    cpu_gemm: Literal["auto", "onednn", "torch"] = Field(
        default="auto",
        description="CPU GEMM kernel: onednn over weights prepacked at load (refused where this CPU lacks "
        "the path: bf16 without AVX-512), torch (its default, MKL's sgemm), or auto: torch's where oneDNN's "
        "path is missing (logged), else the faster of the two, measured once at start-up (GPUs: their own)",
    )
    quantization: Literal["fp8"] | None = Field(
        default=None,
        description="fp8: quantize an unquantized checkpoint's linear layers to FP8 at load (per output channel; "
        "gates and LM head stay); FP8 checkpoints are served as FP8 without it",
    )
    tokenizer_mode: Literal["auto", "hf", "mistral"] = Field(
        default="auto",
        description="auto: mistral-common when the checkpoint has tokenizer.model.v*, else transformers",
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV blocks of shared prompt prefixes (system prompts, earlier turns) across requests",
    )
    attention_backend: Literal["auto", "flex", "sdpa"] = Field(
        default="auto",
        description="Decode attention: flex reads each sequence's KV pages in place (FlexAttention), sdpa gathers each "
        "context into a dense tensor first; auto: flex on GPUs, sdpa on CPU",
    )
    generation_config: Literal["auto", "none"] = Field(
        default="auto",
        description="auto: default temperature, top_p, top_k, repetition_penalty and max tokens from the checkpoint's "
        "generation_config.json; none: OpenAI's defaults",
    )
    override_generation_config: dict[str, float | int] = Field(
        default_factory=dict,
        description='Defaults over the checkpoint\'s, as JSON: {"temperature": 0.5, "top_p": 1, "max_new_tokens": 1024}',
    )
    input_price_per_million: float | None = Field(
        default=None,
        ge=0,
        description="Price per million prompt tokens; with it, usage carries estimated_cost",
    )
    output_price_per_million: float | None = Field(
        default=None,
        ge=0,
        description="Price per million generated tokens; with it, usage carries estimated_cost",
    )
    num_redundant_experts: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Replica slots for hot experts over all shards (EPLB): each holds one more whole expert",
    )
    expert_replicas: int = Field(
        default=1,
        ge=1,
        le=4,
        description="Shards holding each expert (2: a shard's death costs no pause, its experts' other holders "
        "take its tokens while it is replaced; at that many times the experts' memory). Not with EPLB's "
        "num_redundant_experts, which re-plans the replicas",
    )
    eplb_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="Rebalance the expert replicas from the measured load this often while serving; none: only on request",
    )
    expert_metrics: Literal["auto", "expert", "shard"] = Field(
        default="auto",
        description="Prometheus token counts per expert and layer, or per shard only (bounded series: "
        "128 experts x 48 layers x routers is too many); auto: per expert up to 4096 series a router",
    )
    data_plane: Literal["auto", "gloo", "nccl"] = Field(
        default="auto",
        description="Transport of the per-layer expert traffic; auto: nccl with GPUs (gloo between a router and a "
        "shard sharing one GPU), else gloo",
    )
    overlap: bool | None = Field(
        default=None,
        description="Two micro-batches per step, the router's attention of one overlapping the shards' experts of the "
        "other; default: on with GPUs, off on CPU (measured slower there: docs/performance.md)",
    )
    data_plane_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="How long the router waits for a shard's answer before failing the step",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="On shutdown (SIGTERM, redeploy, scale-down): stop accepting, let in-flight requests finish this long",
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS (e.g. https://app.example.com); none: CORS off",
    )
    shard_recovery_timeout_s: float = Field(
        default=180.0, gt=0, description="How long the router waits for a failed expert shard's replacement"
    )
    max_request_body_bytes: int = Field(
        default=4 * 2**20, ge=1024, description="Largest accepted HTTP request body (413 above)"
    )
    placement_strategy: Literal["SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK", "none"] = Field(
        default="SPREAD",
        description="How expert shards go over the nodes (a Ray placement group, one bundle per shard); "
        "none: wherever Serve puts them",
    )
    router_cpus: float = Field(
        default=0.0,
        ge=0,
        description="CPUs the router reserves in Ray (0 lets everything fit a small machine)",
    )
    router_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs the router asks for; default: 1 when the cluster has a GPU for it and each shard, "
        "an even share of them when it has fewer (router and shards share devices), 0 without GPUs",
    )
    shard_cpus: float = Field(default=0.0, ge=0, description="CPUs each expert shard reserves in Ray")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads per process; default: cores / processes on the node",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level")
    access_log_prompts: bool = Field(
        default=False,
        description="Write each request's prompt (messages or prompt) into its access-log line; off: never logged",
    )

    @model_validator(mode="after")
    def _replicas(self) -> RaymixSettings:
        if self.expert_replicas > 1:
            if self.num_redundant_experts:
                raise ValueError(
                    "--expert-replicas and --num-redundant-experts do not go together: choose one"
                )
            if self.expert_shards is not None and 0 < self.expert_shards < self.expert_replicas:
                raise ValueError(
                    f"--expert-replicas {self.expert_replicas} needs at least that many expert shards, "
                    f"not {self.expert_shards}"
                )
        return self

    @model_validator(mode="after")
    def _keys_from_files(self) -> RaymixSettings:
        for keys, path in ((self.api_key, self.api_key_file), (self.admin_api_key, self.admin_api_key_file)):
            if path:
                try:
                    lines = Path(path).read_text().splitlines()
                except OSError as e:
                    raise ValueError(f"cannot read the key file {path}: {e.strerror}") from None
                keys.extend(k.strip() for k in lines if k.strip() and k.strip() not in keys)
        return self

    @field_validator("served_model_name", "api_key", "admin_api_key", "cors_allow_origins", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [s for s in v.split(",") if s] if isinstance(v, str) else v

    @field_validator("override_generation_config", mode="before")
    @classmethod
    def _json_object(cls, v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v

    @field_validator("override_generation_config")
    @classmethod
    def _known_keys(cls, v: dict[str, float | int]) -> dict[str, float | int]:
        unknown = set(v) - GENERATION_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; known: {sorted(GENERATION_KEYS)}")
        return v

    def model_dir(self) -> Path:
        from moe.checkpoint.tiny import default_model_dir

        return Path(self.model) if self.model else default_model_dir()

    def model_names(self) -> list[str]:
        if self.served_model_name:
            return self.served_model_name
        return [Path(self.model).name if self.model else "raymix-tiny-mixtral"]

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            kv_cache_memory_bytes=self.kv_cache_memory_mb * 2**20 if self.kv_cache_memory_mb else None,
            gpu_memory_utilization=self.gpu_memory_utilization,
            dtype=self.dtype,
            quantization=self.quantization,
            cpu_gemm=self.cpu_gemm,
            tokenizer_mode=self.tokenizer_mode,
            overlap=bool(self.overlap),
            max_queued_requests=self.max_queued_requests,
            enable_prefix_caching=self.enable_prefix_caching,
            attention_backend=self.attention_backend,
        )

    @classmethod
    def load(cls, cli: dict[str, Any] | None = None, config_file: str | Path | None = None) -> RaymixSettings:
        """Defaults < YAML file < environment < CLI."""
        merged: dict[str, Any] = {}
        if config_file:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{config_file}: expected a mapping of setting names to values")
            merged |= {k.replace("-", "_"): v for k, v in data.items()}
        from_env = cls()
        merged |= {k: getattr(from_env, k) for k in from_env.model_fields_set}
        merged |= {k: v for k, v in (cli or {}).items() if v is not None}
        return cls(**merged)
