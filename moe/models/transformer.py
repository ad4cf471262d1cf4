"""The one model every family shares: all of it but the routed experts, and its forward.

Embeddings, RMSNorm, attention (fused q/k/v, with the family's biases, q/k norms and clamp), the
experts' gates, shared experts, the dense layers' MLPs and the LM head: what a router holds. The
routed experts live behind an `ExpertBackend`: at each MoE layer the model computes the gate,
routes every token to its top-k experts and hands the flat batch to the backend (in this
process, or remote expert shards); a shared expert (Qwen2-MoE) is computed here meanwhile. A
layer without experts (a dense model's, or `mlp_only_layers`) computes its MLP here.

The forward pass works on flat batches of new tokens from many sequences ([T, H]), as the
continuous-batching engine produces them, and reads as the block it is: attention then MLP, each
added to the residual stream. It takes a list of micro-batches: with two, one's experts of a
layer are computed (remotely) while the other's attention of that layer runs; each goes through
the same ops in the same order either way, only the wait for a layer's MLP output moves to just
before its next layer. The residual stream is kept in float32 whatever the model's dtype (layers
compute in bf16, their outputs add up in float32): in bf16 the greedy path then stays with the
float32 one at least as long as transformers' own bf16 does (tests/test_reference.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from moe.checkpoint.quantization import QuantizationConfig
from moe.checkpoint.reader import CheckpointReader, dense_tensor_shapes, linear_modules
from moe.config import ModelConfig
from moe.engine.kv_cache import KVCache
from moe.expert_parallel.backend import ExpertBackend
from moe.layers import weights
from moe.layers.attention import AttentionMetadata, DecodeMetadata, RotaryEmbedding, apply_rotary
from moe.layers.experts import Routing
from moe.layers.flex_decode import FlexDecodeMetadata
from moe.layers.fp8 import Fp8Tensor, w8a8_supported
from moe.layers.mla import MLAttention
from moe.layers.norm import RMSNorm
from moe.layers.weights import Linear
from moe.models import family

log = logging.getLogger(__name__)
Metadata = AttentionMetadata | DecodeMetadata | FlexDecodeMetadata  # a step's attention inputs
PROJ = ("_proj", "_proj_with_mqa")  # the router's projections: held FP8 where stored so
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.attn_head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        q, kv = self.n_heads * d, self.n_kv * d
        # q, k and v in one GEMM: [Hq·D + 2·Hkv·D, H], the checkpoint's three stacked at load
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=cfg.o_bias)
        self.per_head_norm = cfg.qk_norm == "head"  # Qwen3: each head; OLMoE: the whole projection
        norm_q, norm_k = (d, d) if self.per_head_norm else (q, kv)
        self.q_norm = RMSNorm(norm_q, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(norm_k, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.clip = cfg.clip_qkv

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,  # [slots, Hkv, D]
        v_cache: torch.Tensor,
        meta: Metadata,
    ) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.n_heads * d, self.n_kv * d, self.n_kv * d], dim=-1)
        if self.q_norm is not None and self.k_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # [T, Hq·D], [T, Hkv·D]
        if self.clip is not None:
            q, k, v = (
                q.clamp(-self.clip, self.clip),
                k.clamp(-self.clip, self.clip),
                v.clamp(-self.clip, self.clip),
            )
        q, k, v = q.reshape(t, self.n_heads, d), k.reshape(t, self.n_kv, d), v.reshape(t, self.n_kv, d)
        if self.q_norm is not None and self.k_norm is not None and self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # [T, Hq, D], [T, Hkv, D]
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        out = meta.attend(q, k, v, k_cache, v_cache)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))  # [T, H]


class MLP(nn.Module):
    """SwiGLU, computed here: a dense layer's MLP, or a shared expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)  # gate over up, one GEMM
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)  # [T, H]

    def submit(self, residual: torch.Tensor, x: torch.Tensor, experts: ExpertBackend) -> PendingMLP:
        return PendingMLP(residual, None, self(x))


class MoE(nn.Module):
    """The router of a layer's experts (its gate) and its shared expert; the routed experts are
    the backend's, addressed by this layer's MoE index."""

    def __init__(self, cfg: ModelConfig, moe_index: int):
        super().__init__()
        self.moe_index = moe_index
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.routing = Routing.of(cfg)
        self.router_float32 = cfg.router_float32  # the gate's weight and its input in float32
        # DeepSeek-V3's correction of each expert's score, for the choice only (noaux_tc)
        biased = cfg.topk_method == "noaux_tc"
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_local_experts)) if biased else None
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = MLP(cfg.hidden_size, shared) if shared else None
        gated = shared and cfg.shared_expert_gate
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if gated else None

    def submit(self, residual: torch.Tensor, x: torch.Tensor, experts: ExpertBackend) -> PendingMLP:
        """x [T, H] (normalised) → the layer's pending output: gate, top-k experts per token, the
        experts wherever they live; the shared expert computed here while they run."""
        logits = self.gate(x.float() if self.router_float32 else x)  # [T, E]
        weights, ids = self.routing.select(logits, self.e_score_correction_bias)  # [T, K], [T, K]
        handle = experts.submit(self.moe_index, x, ids, weights)
        shared = None
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [T, H]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return PendingMLP(residual, handle, shared)


@dataclass
class PendingMLP:
    """A micro-batch between its layer's MLP submit and its output."""

    residual: torch.Tensor  # [T_m, H] the stream after attention, before the MLP is added
    handle: object | None  # the backend's handle for the routed experts' output [T_m, H]
    local: torch.Tensor | None  # [T_m, H] what was computed here (a dense MLP, a shared expert)

    def finish(self, experts: ExpertBackend) -> torch.Tensor:
        h = self.residual if self.handle is None else self.residual + experts.wait(self.handle)
        return h if self.local is None else h + self.local  # [T_m, H] float32


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn: Attention | MLAttention = MLAttention(cfg) if cfg.is_mla else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.moe_layers
        self.mlp: MLP | MoE = (
            MoE(cfg, moe.index(layer)) if layer in moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        )


class DenseModel(nn.Module):
    """Everything but the routed experts: what a router holds."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None

    @classmethod
    def from_checkpoint(
        cls,
        reader: CheckpointReader,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        quant: QuantizationConfig | None = None,
        gemm: str = "torch",
    ) -> DenseModel:
        """The router's part, its projections (attention, dense MLPs, shared experts) FP8 where
        the checkpoint stores them so (or `--quantization fp8` asks: quant.method "online");
        gates and LM head always in `dtype`. q/k/v (and gate/up) are stacked into one GEMM's
        weight; linear weights are prepared for the `gemm` kernel (moe.layers.cpu_gemm)."""
        with torch.device("meta"):
            model = cls(cfg)
        shapes = dense_tensor_shapes(cfg)
        linears = linear_modules(cfg)
        matrices = {m: (shapes[m + ".weight"][0], shapes[m + ".weight"][1]) for m in linears}
        # MLA's kv_b_proj is absorbed (moe.layers.mla): read in `dtype`, never a GEMM's weight
        projections = {m: shape for m, shape in matrices.items() if m.endswith(PROJ) and "kv_b_proj" not in m}
        rest = {m: shape for m, shape in matrices.items() if m not in projections}
        # DeepSeek's router (its gates and correction biases) in float32, as transformers keeps it
        fp32 = {m for m in rest if cfg.router_float32 and m.endswith(".gate")}
        held = reader.load_linears(projections, dtype, device, quant, quantize=True)
        for part, part_dtype in (
            ({m: rest[m] for m in rest if m not in fp32}, dtype),
            ({m: rest[m] for m in fp32}, torch.float32),
        ):
            for m, w in reader.load_linears(part, part_dtype, device, quant).items():
                held[m] = w.dequantize(part_dtype) if isinstance(w, Fp8Tensor) else w
        plain = {n: shape for n, shape in shapes.items() if n.removesuffix(".weight") not in linears}
        biases = {n: plain.pop(n) for n in list(plain) if n.endswith("e_score_correction_bias")}
        loaded = reader.load(plain, dtype=dtype, device=device)
        loaded |= reader.load(biases, dtype=torch.float32, device=device) if biases else {}
        for fused, parts in FUSED.items():  # one GEMM's weight (and bias) from the checkpoint's parts
            for m in [m for m in list(held) if m.endswith("." + parts[0])]:
                base = m.removesuffix(parts[0])
                if not all(base + p in held for p in parts):  # MLA's q_proj: no k_proj or v_proj
                    continue
                held[base + fused] = weights.cat_rows([held.pop(base + p) for p in parts])
                if base + parts[0] + ".bias" in loaded:
                    loaded[base + fused + ".bias"] = torch.cat(
                        [loaded.pop(base + p + ".bias") for p in parts]
                    )
        rename = _state_name(cfg)
        state = {rename(n): t for n, t in loaded.items()}
        w8a8 = w8a8_supported(torch.device(device), dtype)
        for m, w in held.items():
            w = weights.prepare(w, gemm) if "kv_b_proj" not in m and m not in fp32 else w
            if isinstance(w, torch.Tensor):
                state[rename(m) + ".weight"] = w
            else:  # FP8 or packed: its module becomes a moe.layers.weights.Linear holding it
                parent, _, attr = rename(m).rpartition(".")  # "" for lm_head: the model
                bias = getattr(model.get_submodule(rename(m)), "bias", None) is not None
                setattr(model.get_submodule(parent), attr, Linear(w, w8a8, bias))
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        model.rotary = RotaryEmbedding(cfg.rope_dim, cfg.rope_theta, device, cfg.yarn)
        if cfg.num_nextn_predict_layers:
            log.info(
                "not reading the checkpoint's %d multi-token-prediction layer(s) (num_nextn_predict_layers): "
                "decoding does not use them",
                cfg.num_nextn_predict_layers,
            )
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def nbytes(self) -> int:
        """Bytes of the weights held (FP8 projections with their scales)."""
        held = [m.held for m in self.modules() if isinstance(m, Linear)]
        return sum(p.numel() * p.element_size() for p in self.parameters()) + sum(map(weights.nbytes, held))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @torch.inference_mode()
    def forward(  # type: ignore[override]
        self,
        micro_batches: list[tuple[torch.Tensor, Metadata]],  # ([T_m] ids, their metadata) each
        kv_cache: KVCache,
        experts: ExpertBackend,
    ) -> list[torch.Tensor]:
        """→ each micro-batch's final hidden states [T_m, H] (after the last norm)."""
        assert self.rotary is not None
        hs = [self.embed(ids) for ids, _ in micro_batches]  # [T_m, H] each, float32
        cos_sin = [self.rotary.cos_sin(meta.positions, self.dtype) for _, meta in micro_batches]
        pending: list[PendingMLP | None] = [None] * len(hs)
        for i, layer in enumerate(cast(list[DecoderLayer], self.layers)):
            for m, (_, meta) in enumerate(micro_batches):
                p = pending[m]
                h = hs[m] if p is None else p.finish(experts)  # layer i-1's MLP output added
                h = h + layer.self_attn(
                    layer.input_layernorm(h), cos_sin[m], kv_cache.k[i], kv_cache.v[i], meta
                )
                pending[m] = layer.mlp.submit(h, layer.post_attention_layernorm(h), experts)
        return [self.norm(cast(PendingMLP, p).finish(experts)) for p in pending]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] → the residual stream's start [T, H], in float32."""
        return self.embed_tokens(input_ids).float()

    @torch.inference_mode()
    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, H] → logits [B, V] in float32."""
        return self.lm_head(h).float()


def _state_name(cfg: ModelConfig):
    """A checkpoint's tensor or module name → DenseModel's (the family's MoE block is `mlp`)."""
    f = family(cfg.model_type)

    def rename(name: str) -> str:
        name = name.removeprefix("model.").replace(f".{f.moe_block}.", ".mlp.")
        name = name.replace(f".mlp.{f.shared_expert}.", ".mlp.shared_expert.")
        return name.replace(".gate.e_score_correction_bias", ".e_score_correction_bias")

    return rename
