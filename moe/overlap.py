"""The two-micro-batch overlap: a driver over the model's layers, not a change to them.

With remote experts, a layer's MoE leaves the router idle while the shards compute. Two
disjoint micro-batches of the step run layer by layer in turn: while micro-batch A's experts of
layer i are computed remotely, the router runs micro-batch B's attention of layer i, and so on.
Each micro-batch goes through exactly the ops of `MixtralDense.forward` in the same order (so
the result is the same either way); only the wait for a layer's MoE output moves to just before
that micro-batch's next layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from moe.attention import AttentionMetadata
from moe.backend import ExpertBackend
from moe.flex_decode import FlexDecodeMetadata
from moe.kv_cache import KVCache
from moe.model import DecoderLayer, MixtralDense


@dataclass
class PendingMoE:
    """A micro-batch between its layer's MoE submit and its output."""

    residual: torch.Tensor  # [T_m, H] the stream after attention, before the MoE is added
    handle: object  # the backend's handle for the MoE output [T_m, H]

    def finish(self, experts: ExpertBackend) -> torch.Tensor:
        return self.residual + experts.wait(self.handle)  # [T_m, H]


@torch.inference_mode()
def forward_overlapped(
    model: MixtralDense,
    micro_batches: list[
        tuple[torch.Tensor, AttentionMetadata | FlexDecodeMetadata]
    ],  # ([T_m] ids, metadata) each
    kv_cache: KVCache,
    experts: ExpertBackend,
) -> list[torch.Tensor]:
    """→ the final hidden states [T_m, H] of each micro-batch (after the last norm)."""
    assert model.rotary is not None
    hs = [model.embed(ids) for ids, _ in micro_batches]  # [T_m, H] each, float32
    cos_sin = [model.rotary.cos_sin(meta.positions, model.dtype) for _, meta in micro_batches]
    pending: list[PendingMoE | None] = [None] * len(hs)
    for i, layer in enumerate(cast(list[DecoderLayer], model.layers)):
        for m, (_, meta) in enumerate(micro_batches):
            p = pending[m]
            h = hs[m] if p is None else p.finish(experts)  # layer i-1's MoE output added
            h = h + layer.self_attn(layer.input_layernorm(h), cos_sin[m], kv_cache.k[i], kv_cache.v[i], meta)
            pending[m] = PendingMoE(h, layer.submit_moe(i, layer.post_attention_layernorm(h), experts))
    return [model.norm(cast(PendingMoE, p).finish(experts)) for p in pending]
