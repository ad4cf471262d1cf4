"""Capacity model on paper: memory per shard, bytes per dispatch, expected decode step time.

For a model's config (any family) and a number of expert shards (one GPU each) plus the router's GPU:
parameters and bytes per shard, the router's dense weights, KV bytes per token, bytes that cross
the data plane per MoE layer, and a decode step time from first principles (weights streamed
from HBM once per step; the dispatch over NVLink or InfiniBand; per-message latency). With
`fp8`, the experts' and attention projections' weights count one byte each plus a float32 scale
per output row (moe.layers.fp8); embeddings, norms, gates and LM head stay at `dtype_bytes`. The
MLPs of dense layers (all of a dense model's) and shared experts are counted in the router's
part. It is a model, not a measurement: docs/performance.md sets it beside what was measured on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig
from moe.expert_parallel.placement import partition_experts

MIXTRAL_8X7B = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
)
MIXTRAL_8X22B = ModelConfig(
    vocab_size=32768,
    hidden_size=6144,
    intermediate_size=16384,
    num_hidden_layers=56,
    num_attention_heads=48,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=65536,
)
QWEN3_30B_A3B = ModelConfig(  # Qwen/Qwen3-30B-A3B's config.json
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_local_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    qk_norm="head",
    max_position_embeddings=40960,
)
QWEN3_235B_A22B = ModelConfig(  # Qwen/Qwen3-235B-A22B's config.json
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    num_hidden_layers=94,
    num_attention_heads=64,
    num_key_value_heads=4,
    head_dim=128,
    num_local_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    qk_norm="head",
    max_position_embeddings=40960,
)
DEEPSEEK_V3 = ModelConfig(  # deepseek-ai/DeepSeek-V3's config.json (R1 and V3.1 have its shape)
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    num_local_experts=256,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    shared_expert_intermediate_size=2048,
    shared_expert_gate=False,
    mlp_only_layers=(0, 1, 2),
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rope_interleave=True,
    rope_theta=10000.0,
    max_position_embeddings=163840,
)
NAMED = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    "mixtral-8x22b": MIXTRAL_8X22B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "qwen3-235b-a22b": QWEN3_235B_A22B,
    "deepseek-v3": DEEPSEEK_V3,
}
LINKS = {  # effective one-way bandwidth (bytes/s) and per-message latency (s)
    "nvlink": (300e9, 8e-6),
    "infiniband-200g": (25e9, 12e-6),
}


@dataclass
class Plan:
    expert_groups: list[list[int]]
    params_per_expert: int
    shard_params: list[int]
    dense_params: int
    kv_bytes_per_token: int
    dispatch_bytes_per_token_layer: int
    bytes_per_expert: int  # one expert id's weights across all layers, as held (FP8 with scales)
    dense_bytes: int  # the router's weights, as held

    def shard_bytes(self) -> list[int]:
        return [len(g) * self.bytes_per_expert for g in self.expert_groups]


def capacity_plan(cfg: ModelConfig, num_shards: int, dtype_bytes: int = 2, fp8: bool = False) -> Plan:
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    i, moe_layers = cfg.expert_intermediate_size, cfg.num_moe_layers
    weight_bytes = 1 if fp8 else dtype_bytes
    scale_bytes = 4 if fp8 else 0  # per output row

    def mlp(inter: int) -> tuple[int, int]:  # a SwiGLU's (parameters, bytes as held)
        return 3 * h * inter, 3 * h * inter * weight_bytes + (2 * inter + h) * scale_bytes

    per_expert, expert_bytes = (n * moe_layers for n in mlp(i))  # one expert id across all MoE layers
    groups = partition_experts(cfg.num_local_experts, num_shards) if cfg.is_moe and num_shards else []
    attn, rows, attn_norms = attention_params(cfg)
    gate_width = cfg.num_local_experts * (h + (1 if cfg.topk_method == "noaux_tc" else 0))
    gates = moe_layers * (
        gate_width + (h if cfg.shared_expert_intermediate_size and cfg.shared_expert_gate else 0)
    )
    other = gates + L * (2 * h + attn_norms) + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h
    dense = L * attn + other
    dense_bytes = L * (attn * weight_bytes + rows * scale_bytes) + other * dtype_bytes
    local = [cfg.intermediate_size] * (L - moe_layers)  # dense layers' MLPs, on the router
    local += [cfg.shared_expert_intermediate_size] * moe_layers if cfg.shared_expert_intermediate_size else []
    for inter in local:
        n, b = mlp(inter)
        dense, dense_bytes = dense + n, dense_bytes + b
    kv = L * cfg.kv_values_per_token * dtype_bytes
    # a token goes to at most top_k shards, and its result comes back: 2 directions
    dispatch = 2 * cfg.num_experts_per_tok * h * dtype_bytes if groups else 0
    return Plan(
        groups,
        per_expert,
        [len(g) * per_expert for g in groups],
        dense,
        kv,
        dispatch,
        expert_bytes,
        dense_bytes,
    )


def attention_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """A layer's attention: (projection parameters, their output rows, norm parameters). GQA: q,
    k, v, o; MLA: the q down- and up-projections (or one q), the KV down-projection to the latent
    and rotary key, the KV up-projection (absorbed), o, and the two latent norms."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    if not cfg.is_mla:
        d = cfg.attn_head_dim
        q, kv = nh * d, cfg.num_key_value_heads * d
        norms = (2 * d if cfg.qk_norm == "head" else q + kv) if cfg.qk_norm else 0
        return 2 * h * q + 2 * h * kv, 2 * q + 2 * kv, norms
    r, rq, dr = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim
    q_out, kv_b_out = nh * (cfg.qk_nope_head_dim + dr), nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    q_params, q_rows = (h * rq + rq * q_out, rq + q_out) if rq else (h * q_out, q_out)
    params = q_params + h * (r + dr) + r * kv_b_out + nh * cfg.v_head_dim * h
    return params, q_rows + (r + dr) + kv_b_out + h, r + (rq or 0)


def decode_step_seconds(
    cfg: ModelConfig,
    num_shards: int,
    batch: int,
    link: str,
    hbm_bytes_per_s: float = 2.0e12,
    dtype_bytes: int = 2,
    fp8: bool = False,
) -> dict[str, float]:
    """Memory-bound decode: each shard streams the weights of the experts its tokens hit; the
    router streams the dense weights; the data plane moves `batch` tokens per layer."""
    p = capacity_plan(cfg, num_shards, dtype_bytes, fp8)
    bw, lat = LINKS[link]
    moe_layers = max(cfg.num_moe_layers, 1)
    per_layer_expert_bytes = p.bytes_per_expert / moe_layers
    # the busiest shard reads each of its experts that a token hits (all of them once batch x top_k
    # covers them); the shards read in parallel
    held = max((len(g) for g in p.expert_groups), default=0)
    hit = min(held, batch * cfg.num_experts_per_tok)
    expert_s = hit * per_layer_expert_bytes * cfg.num_moe_layers / hbm_bytes_per_s
    dense_s = p.dense_bytes / hbm_bytes_per_s
    # per layer the router's link carries batch x top_k hidden states out and as many back
    # (full duplex: the two directions overlap), plus a message latency each way
    one_way = batch * cfg.num_experts_per_tok * cfg.hidden_size * dtype_bytes
    dispatch_s = cfg.num_moe_layers * (one_way / bw + 2 * lat) if p.expert_groups else 0.0
    total = expert_s + dense_s + dispatch_s
    return {
        "experts_s": expert_s,
        "dense_s": dense_s,
        "dispatch_s": dispatch_s,
        "step_s": total,
        "tok_s": batch / total,
    }


def gpus_needed(
    cfg: ModelConfig, gpu_bytes: float, dtype_bytes: int = 2, headroom: float = 0.8, fp8: bool = False
) -> int:
    """Fewest expert shards whose largest shard fits `headroom` of a GPU, plus the router's GPU
    (a dense model: the router's alone)."""
    if not cfg.is_moe:
        if capacity_plan(cfg, 0, dtype_bytes, fp8).dense_bytes > headroom * gpu_bytes:
            raise ValueError("the model does not fit one GPU: it needs tensor parallelism")
        return 1
    for n in range(1, cfg.num_local_experts + 1):
        if max(capacity_plan(cfg, n, dtype_bytes, fp8).shard_bytes()) <= headroom * gpu_bytes:
            return n + 1
    raise ValueError(
        "even one expert per shard does not fit: this model needs tensor parallelism inside a shard"
    )


def router_kv_tokens(
    cfg: ModelConfig,
    gpu_bytes: float,
    gpu_memory_utilization: float = 0.9,
    dtype_bytes: int = 2,
    fp8: bool = False,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 64,
) -> int:
    """Tokens of KV cache the router's GPU holds: what gpu_memory_utilization of it leaves after
    the dense weights, the activations and the decode graphs (moe.engine.kv_cache's sizing, on paper)."""
    import torch

    from moe.engine.kv_cache import GRAPH_RESERVE_BYTES, activation_bytes

    dtype = torch.bfloat16 if dtype_bytes == 2 else torch.float32
    p = capacity_plan(cfg, 1 if cfg.is_moe else 0, dtype_bytes, fp8)
    act = activation_bytes(cfg, max_num_batched_tokens, max_num_seqs, dtype)
    free = gpu_memory_utilization * gpu_bytes - p.dense_bytes - act - GRAPH_RESERVE_BYTES
    return max(0, int(free // p.kv_bytes_per_token))


@dataclass(frozen=True)
class Split:
    """M routers and N expert shards on M + N GPUs, and what the step model predicts for them."""

    routers: int
    shards: int
    batch: int  # sequences per router (its KV cache's worth of `context`, at most max_num_seqs)
    router_s: float  # one router's decode step: dense weights, attention over the KV, dispatch
    shard_s: float  # one shard's work per round: a layer batch from each router, one at a time
    tok_s: float  # the cluster's decode throughput: M x batch per round
    tok_s_per_gpu: float


def disaggregated_split(
    cfg: ModelConfig,
    routers: int,
    shards: int,
    gpu_bytes: float = 80e9,
    context: int = 2048,
    max_num_seqs: int = 256,
    link: str = "nvlink",
    hbm_bytes_per_s: float = 2.0e12,
    flops: float = 6.0e14,  # dense bf16 a GPU sustains (H100: ~0.6 of its 989 TFLOP/s peak)
    dtype_bytes: int = 2,
    fp8: bool = False,
) -> Split | None:
    """The per-step model of M routers sharing N shards (None where the experts do not fit).

    A router runs `batch` sequences of `context` tokens: per step it streams its dense weights
    and its sequences' KV from HBM (or computes, whichever is longer) and sends each MoE layer's
    tokens out and back. A shard, per layer batch, streams the weights of the experts the batch
    hits, or computes its tokens' SwiGLUs; raymix computes the routers' batches one at a time, so
    a round (every router one step) costs it M batches. With two micro-batches the two sides
    overlap, and a round takes the longer of the two."""
    p = capacity_plan(cfg, shards, dtype_bytes, fp8)
    if max(p.shard_bytes()) > 0.9 * gpu_bytes:
        return None
    kv_tokens = router_kv_tokens(cfg, gpu_bytes, 0.9, dtype_bytes, fp8, max_num_seqs=max_num_seqs)
    batch = min(max_num_seqs, kv_tokens // context)
    if batch == 0:
        return None
    one = decode_step_seconds(cfg, shards, batch, link, hbm_bytes_per_s, dtype_bytes, fp8)  # its reads
    read = p.dense_bytes + batch * context * p.kv_bytes_per_token
    router_s = max(read / hbm_bytes_per_s, 2 * p.dense_params * batch / flops) + one["dispatch_s"]
    held = max(len(g) for g in p.expert_groups)
    tokens = batch * cfg.num_experts_per_tok * held / cfg.num_local_experts  # one shard's, from one router
    shard_batch_s = max(one["experts_s"], 2 * p.params_per_expert * tokens / flops)
    shard_s = routers * shard_batch_s
    tok_s = routers * batch / max(router_s, shard_s)
    return Split(routers, shards, batch, router_s, shard_s, tok_s, tok_s / (routers + shards))


def best_split(cfg: ModelConfig, gpus: int, **kw: float | int | str | bool) -> list[Split]:
    """Every M:N with M + N = `gpus` whose experts fit, best per-GPU throughput first."""
    splits = [
        s
        for n in range(1, min(cfg.num_local_experts, gpus - 1) + 1)
        if (s := disaggregated_split(cfg, gpus - n, n, **kw)) is not None  # type: ignore[arg-type]
    ]
    return sorted(splits, key=lambda s: -s.tok_s_per_gpu)
