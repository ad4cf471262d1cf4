"""The dense part of Mixtral: embeddings, RMSNorm, attention, the gates and the LM head.

Everything but the experts, which live behind an `ExpertBackend`: at each layer the model
computes the gate, routes every token to its top-k experts and hands the flat batch to the
backend (in this process, or remote expert shards). The forward pass works on flat batches of
new tokens from many sequences ([T, H]), as the continuous-batching engine produces them, and
reads as the block it is: attention then MoE, each added to the residual stream. It takes a
list of micro-batches: with two, one's experts of a layer are computed (remotely) while the
other's attention of that layer runs; each goes through the same ops in the same order either
way, only the wait for a layer's MoE output moves to just before its next layer. The residual
stream is kept in float32 whatever the model's dtype (layers compute in bf16, their outputs add
up in float32): in bf16 the greedy path then stays with the float32 one at least as long as
transformers' own bf16 does (tests/test_reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from moe.checkpoint.quantization import QuantizationConfig
from moe.checkpoint.reader import CheckpointReader, dense_tensor_shapes, linear_modules
from moe.config import ModelConfig
from moe.engine.kv_cache import KVCache
from moe.expert_parallel.backend import ExpertBackend
from moe.layers import weights
from moe.layers.attention import AttentionMetadata, DecodeMetadata, RotaryEmbedding, apply_rotary
from moe.layers.experts import select_experts
from moe.layers.flex_decode import FlexDecodeMetadata
from moe.layers.fp8 import Fp8Tensor, w8a8_supported
from moe.layers.weights import Linear

Metadata = AttentionMetadata | DecodeMetadata | FlexDecodeMetadata  # a step's attention inputs


def _state_name(checkpoint_name: str) -> str:
    """A checkpoint's tensor or module name → MixtralDense's."""
    return checkpoint_name.removeprefix("model.").replace("block_sparse_moe.gate", "gate")


class RMSNorm(nn.Module):
    """Normalised in float32 (as transformers does); the output is in the weights' dtype, whatever
    the input's (the residual stream is float32, the layers compute in the model's dtype)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.attn_head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        # q, k and v in one GEMM: [Hq·D + 2·Hkv·D, H], the checkpoint's three stacked at load
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, cfg.hidden_size, bias=False)

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
        q = qkv[:, : self.n_heads * d].view(t, self.n_heads, d)  # [T, Hq, D]
        k = qkv[:, self.n_heads * d : (self.n_heads + self.n_kv) * d].view(t, self.n_kv, d)  # [T, Hkv, D]
        v = qkv[:, (self.n_heads + self.n_kv) * d :].view(t, self.n_kv, d)  # [T, Hkv, D]
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        out = meta.attend(q, k, v, k_cache, v_cache)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))  # [T, H]


class DecoderLayer(nn.Module):
    """One layer's dense weights; its experts are elsewhere (the backend)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # a dense model has no gate: its MLP is the one expert, every token's with weight 1
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False) if cfg.is_moe else None
        self.top_k = cfg.num_experts_per_tok

    def submit_moe(self, layer: int, x: torch.Tensor, experts: ExpertBackend) -> object:
        """x [T, H] (normalised) → the backend's handle for this layer's MoE output [T, H]:
        gate, top-k experts per token, then the experts wherever they live."""
        if self.gate is None:
            ids = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)  # [T, 1]
            return experts.submit(layer, x, ids, torch.ones(x.shape[0], 1, device=x.device))
        weights, ids = select_experts(self.gate(x), self.top_k)  # [T, K], [T, K]
        return experts.submit(layer, x, ids, weights)


@dataclass
class PendingMoE:
    """A micro-batch between its layer's MoE submit and its output."""

    residual: torch.Tensor  # [T_m, H] the stream after attention, before the MoE is added
    handle: object  # the backend's handle for the MoE output [T_m, H]

    def finish(self, experts: ExpertBackend) -> torch.Tensor:
        return self.residual + experts.wait(self.handle)  # [T_m, H]


class MixtralDense(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
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
    ) -> MixtralDense:
        """The dense part, its attention projections FP8 where the checkpoint stores them so (or
        `--quantization fp8` asks: quant.method "online"); gates and LM head always in `dtype`.
        Linear weights are prepared for the `gemm` kernel (moe.layers.cpu_gemm: packed for oneDNN)."""
        with torch.device("meta"):
            model = cls(cfg)
        shapes = dense_tensor_shapes(cfg)
        linears = linear_modules(cfg)
        matrices = {m: (shapes[m + ".weight"][0], shapes[m + ".weight"][1]) for m in linears}
        projections = {m: shape for m, shape in matrices.items() if m.endswith("_proj")}
        rest = {m: shape for m, shape in matrices.items() if m not in projections}
        held = reader.load_linears(projections, dtype, device, quant, quantize=True)
        for m, w in reader.load_linears(rest, dtype, device, quant).items():
            held[m] = w.dequantize(dtype) if isinstance(w, Fp8Tensor) else w
        for layer in range(cfg.num_hidden_layers):  # q, k, v stacked into one GEMM's weight
            p = f"model.layers.{layer}.self_attn."
            held[p + "qkv_proj"] = weights.cat_rows([held.pop(p + x) for x in ("q_proj", "k_proj", "v_proj")])
        plain = {n: shape for n, shape in shapes.items() if n.removesuffix(".weight") not in linears}
        state = {_state_name(n): t for n, t in reader.load(plain, dtype=dtype, device=device).items()}
        w8a8 = w8a8_supported(torch.device(device), dtype)
        for m, w in held.items():
            w = weights.prepare(w, gemm)
            if isinstance(w, torch.Tensor):
                state[_state_name(m) + ".weight"] = w
            else:  # FP8 or packed: its module becomes a moe.layers.weights.Linear holding it
                parent, _, attr = _state_name(m).rpartition(".")  # "" for lm_head: the model
                setattr(model.get_submodule(parent), attr, Linear(w, w8a8))
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        model.rotary = RotaryEmbedding(cfg.attn_head_dim, cfg.rope_theta, device)
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
        pending: list[PendingMoE | None] = [None] * len(hs)
        for i, layer in enumerate(cast(list[DecoderLayer], self.layers)):
            for m, (_, meta) in enumerate(micro_batches):
                p = pending[m]
                h = hs[m] if p is None else p.finish(experts)  # layer i-1's MoE output added
                h = h + layer.self_attn(
                    layer.input_layernorm(h), cos_sin[m], kv_cache.k[i], kv_cache.v[i], meta
                )
                pending[m] = PendingMoE(h, layer.submit_moe(i, layer.post_attention_layernorm(h), experts))
        return [self.norm(cast(PendingMoE, p).finish(experts)) for p in pending]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] → the residual stream's start [T, H], in float32."""
        return self.embed_tokens(input_ids).float()

    @torch.inference_mode()
    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, H] → logits [B, V] in float32."""
        return self.lm_head(h).float()
