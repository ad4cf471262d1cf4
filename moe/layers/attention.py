"""Rotary embeddings and GQA attention over the paged KV cache, for a flat batch of tokens.

A step's batch is the new tokens of B sequences laid end to end ([T] with T = sum of each
sequence's new tokens: the whole prompt at prefill, one token at decode). `AttentionMetadata`
is built once per step and shared by every layer: where each new token's K/V is written
(`slot_mapping`), and for each sequence the cache slots of its whole context (`kv_slots`) with a
mask that is causal, bounded by the context length and, if the model has one, by the sliding
window. Attention is then one batched `scaled_dot_product_attention` over [B, max_q] × [B, max_kv].

`DecodeMetadata` is the same for a step of decodes only (one new token per sequence) in
fixed-shape tensors, as the CUDA-graph runner (moe.engine.decode_path) keeps them in static buffers
(`DenseDecode`): padded rows write to a scratch slot and see only it. It stays the reference
for the decode attention that reads the pages in place (moe.layers.flex_decode).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moe.config import Yarn
from moe.engine.kv_cache import KVCache


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V is written to
    q_index: torch.Tensor  # [B, Lq] row of the flat batch for each (sequence, query); pads point at 0
    q_rows: torch.Tensor  # [T] where each new token is in the [B·Lq] (sequence, query) grid
    kv_slots: torch.Tensor  # [B, Lk] flat cache slots of each sequence's context; pads point at 0
    mask: torch.Tensor  # [B, 1, Lq, Lk] bool, True where a query may attend to a key

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        context_lens: list[int],
        num_new: list[int],
        block_size: int,
        sliding_window: int | None,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """For each sequence b of the step: its block table, its context length after this step
        (cached + new tokens) and how many of its last positions are new in this step."""
        b = len(block_tables)
        lq, lk = max(num_new), max(context_lens)
        nb = max(len(t) for t in block_tables)
        tables = padded_rows(block_tables, [len(t) for t in block_tables], nb).long()  # [B, nb]
        k_len = torch.tensor(context_lens)  # [B]
        n_new = torch.tensor(num_new)  # [B]
        k_pos = torch.arange(lk)  # [Lk]
        kv_slots = torch.gather(tables, 1, (k_pos // block_size).clamp(max=nb - 1).expand(b, -1)) * block_size
        kv_slots += k_pos % block_size  # [B, Lk]
        kv_slots = torch.where(k_pos[None] < k_len[:, None], kv_slots, 0)
        j = torch.arange(lq)  # [Lq]
        q_valid = j[None] < n_new[:, None]  # [B, Lq]
        q_pos = k_len[:, None] - n_new[:, None] + j[None]  # [B, Lq]
        starts = torch.cumsum(n_new, 0) - n_new  # [B] first flat row of each sequence
        q_index = torch.where(q_valid, starts[:, None] + j[None], 0)  # [B, Lq]
        mask = (k_pos[None, None] <= q_pos[:, :, None]) & (k_pos[None, None] < k_len[:, None, None])
        if sliding_window is not None:
            mask &= k_pos[None, None] > q_pos[:, :, None] - sliding_window
        mask[:, :, 0] |= ~q_valid  # pad queries see key 0 so no row is fully masked (no NaN)
        positions = q_pos[q_valid]  # [T]
        slot_mapping = kv_slots.gather(1, q_pos.clamp(max=lk - 1))[q_valid]  # [T]
        q_rows = q_valid.flatten().nonzero().squeeze(1)  # [T], on the host: no sync per layer
        return cls(
            positions=positions.to(device, non_blocking=True),
            slot_mapping=slot_mapping.to(device, non_blocking=True),
            q_index=q_index.to(device, non_blocking=True),
            q_rows=q_rows.to(device, non_blocking=True),
            kv_slots=kv_slots.to(device, non_blocking=True),
            mask=mask[:, None].to(device, non_blocking=True),
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        return paged_attention(q, k, v, k_cache, v_cache, self)


@dataclass
class DecodeMetadata:
    """One new token per sequence (B rows, padded ones included), every tensor fixed-shape."""

    positions: torch.Tensor  # [B] position of each new token (its context length - 1)
    slot_mapping: torch.Tensor  # [B] cache slot its K/V is written to (pads: the scratch slot)
    kv_slots: torch.Tensor  # [B, L] cache slots of each context, L a bucket ≥ the longest (pads: scratch)
    mask: torch.Tensor  # [B, L] bool, True on the context's keys (in the sliding window, if any)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, Hkv, D] → [B, Hq, D]; no data-dependent shapes, no host sync."""
        k_cache[self.slot_mapping] = k
        v_cache[self.slot_mapping] = v
        kb = gather_slots(k_cache, self.kv_slots).transpose(1, 2)  # [B, Hkv, L, D]
        vb = gather_slots(v_cache, self.kv_slots).transpose(1, 2)  # [B, Hkv, L, Dv]
        mask = self.mask[:, None, None, :]  # [B, 1, 1, L]
        return attend_heads(q[:, :, None], kb, vb, mask)[:, :, 0]  # [B, Hq, Dv]


class DenseDecode:
    """Static buffers of `DecodeMetadata` for decode steps of up to `max_batch` sequences with
    contexts up to `max_context` (the reference decode attention of the CUDA-graph runner)."""

    def __init__(self, kv_cache: KVCache, max_batch: int, max_context: int, sliding_window: int | None):
        dev = kv_cache.k.device
        self.block_size, self.scratch, self.sliding_window = (
            kv_cache.block_size,
            kv_cache.scratch_slot,
            sliding_window,
        )
        self.kv_slots = torch.zeros(max_batch, max_context, dtype=torch.long, device=dev)  # [B, L]
        self.mask = torch.zeros(max_batch, max_context, dtype=torch.bool, device=dev)  # [B, L]

    def fill(self, tables: list[list[int]], context_lens: list[int], bsz: int, ctx: int) -> None:
        """Write the step's context slots and mask into [:bsz, :ctx] (on the host, then one copy
        each); padded rows see the scratch slot alone, so no row is fully masked (no NaN)."""
        n, bs = len(tables), self.block_size
        width = -(-ctx // bs)
        table = padded_rows(tables, [min(len(t), width) for t in tables], width).long()  # [n, W]
        k_len = torch.tensor(context_lens)  # [n]
        pos = torch.arange(ctx)  # [L]
        mask = pos[None] < k_len[:, None]  # [n, L]
        if self.sliding_window is not None:
            mask &= pos[None] > (k_len[:, None] - 1) - self.sliding_window
        slots = torch.where(mask, table[:, pos // bs] * bs + pos % bs, self.scratch)  # [n, L]
        slots = torch.cat([slots, torch.full((bsz - n, ctx), self.scratch)])
        mask = torch.cat([mask, torch.zeros(bsz - n, ctx, dtype=torch.bool)])
        mask[n:, 0] = True
        self.kv_slots[:bsz, :ctx].copy_(slots, non_blocking=True)
        self.mask[:bsz, :ctx].copy_(mask, non_blocking=True)

    def metadata(
        self, positions: torch.Tensor, slot_mapping: torch.Tensor, bsz: int, ctx: int
    ) -> DecodeMetadata:
        return DecodeMetadata(positions, slot_mapping, self.kv_slots[:bsz, :ctx], self.mask[:bsz, :ctx])


def padded_rows(rows: list[list[int]], lengths: list[int], width: int) -> torch.Tensor:
    """The first lengths[i] entries of each row, as an int32 [n, width] tensor zero-padded on the
    right: one flat list written through one mask (numpy: microseconds where small torch ops
    cost ten each; the tensor shares its memory)."""
    out = np.zeros((len(rows), width), dtype=np.int32)
    out[np.arange(width) < np.asarray(lengths)[:, None]] = list(
        itertools.chain.from_iterable(r[:k] for r, k in zip(rows, lengths, strict=True))
    )
    return torch.from_numpy(out)


def decode_slots(tables: list[list[int]], context_lens: list[int], block_size: int) -> list[int]:
    """The cache slot of each sequence's new (last) token, at position context_len - 1."""
    return [
        t[(c - 1) // block_size] * block_size + (c - 1) % block_size
        for t, c in zip(tables, context_lens, strict=True)
    ]


class RotaryEmbedding:
    """RoPE in the rotate-half form over `dim` values, computed in float32 exactly as transformers
    does; with YaRN (DeepSeek), its frequencies and the scale it puts on cos and sin."""

    def __init__(self, dim: int, theta: float, device: torch.device | str, yarn: Yarn | None = None):
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        self.inv_freq = 1.0 / (theta**exponent)  # [D/2]
        self.scale = 1.0  # what cos and sin are multiplied by
        if yarn is not None:
            low, high = yarn.correction_range(dim, theta)
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(
                0, 1
            )
            pos_freqs = theta**exponent  # [D/2]
            extrapolate = 1 - ramp  # 1 for the fast frequencies (kept), 0 for the slow (divided by factor)
            self.inv_freq = (1 / (yarn.factor * pos_freqs)) * (1 - extrapolate) + (
                1 / pos_freqs
            ) * extrapolate
            self.scale = yarn.cos_sin_scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        if self.scale != 1.0:
            return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [slots, Hkv, D], slots [B, L] → [B, L, Hkv, D]: one index_select over the flattened
    slots, the same values as `cache[slots]` (advanced indexing), which on the CPU is ~2.6x
    slower (4.2 vs 1.6 ms a step at 32 decodes, one thread: docs/performance.md)."""
    return cache.index_select(0, slots.flatten()).view(*slots.shape, *cache.shape[1:])


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens; k_cache/v_cache [slots, Hkv, D] of one
    layer (written in place) → attention output [T, Hq, D]."""
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    qb = q[meta.q_index].transpose(1, 2)  # [B, Hq, Lq, D]
    kb = gather_slots(k_cache, meta.kv_slots).transpose(1, 2)  # [B, Hkv, Lk, D]
    vb = gather_slots(v_cache, meta.kv_slots).transpose(1, 2)  # [B, Hkv, Lk, D]
    out = attend_heads(qb, kb, vb, meta.mask)  # [B, Hq, Lq, Dv]
    b, hq, lq, d = out.shape
    return out.transpose(1, 2).reshape(b * lq, hq, d).index_select(0, meta.q_rows)  # [T, Hq, Dv]


def attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], mask [B, 1, Lq, Lk] → [B, Hq, Lq, Dv].
    GQA: each KV head serves Hq / Hkv query heads; enable_gqa spares copying K/V that many times
    (at 32 decode streams of the hidden-512 model: 4.5 -> 1.4 ms per layer on one CPU thread).
    One KV head (MLA): every head's queries as queries of that head, [B, 1, Hq·Lq, D], so no
    kernel copies K and V per head (SDPA's GQA path would; on this CPU 4.8x slower)."""
    b, hq, lq, _ = q.shape
    if k.shape[1] == 1 < hq:
        # [B, 1, Hq·Lq, Lk]; one query a head (decode): [B, 1, 1, Lk] already broadcasts
        folded = mask if lq == 1 else mask.expand(b, hq, lq, -1).reshape(b, 1, hq * lq, -1)
        out = F.scaled_dot_product_attention(q.reshape(b, 1, hq * lq, -1), k, v, attn_mask=folded)
        return out.view(b, hq, lq, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != hq)
