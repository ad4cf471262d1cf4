"""Decode attention that reads each sequence's KV pages where they lie, with FlexAttention.

The reference decode attention (moe.layers.attention.DecodeMetadata) gathers every sequence's context
into a dense [B, L] tensor in every layer, L a power-of-two bucket: B·L·Hkv·D elements of K and
of V copied out of the cache and read again, padding included. Here the cache of one layer is
seen as one long sequence of slots, [1, Hkv, slots, D] (a view, no copy), and decode query b
attends to it through a block mask whose blocks are the KV cache's own blocks: row b of the
mask lists b's block table, so the kernel reads the pages of b's context and nothing else, once.
Within those pages `mask_mod` maps a slot back to its position in b's sequence (physical →
logical block, as vLLM's FlexAttention backend does) and keeps the positions below b's context
length (and inside the sliding window, if the model has one).

Compiled (torch.compile, on CUDA), this is FlexAttention's decoding kernel, one per batch
bucket: the query heads of a GQA group share each K/V tile, the context is split across SMs.
Every tensor it reads lives in the static buffers below, so the decode CUDA graph captures it,
and no shape depends on the contexts: one graph per batch bucket, not per context bucket.
Uncompiled (the CPU tests), FlexAttention runs its reference path, which scores every slot of
the cache: the same mask, for checking it, slow.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from moe.engine.kv_cache import KVCache
from moe.layers.attention import padded_rows

log = logging.getLogger(__name__)

Q_BLOCK = 16  # the block mask's query tile: one row of blocks for the one query of each sequence
# compiled versions of flex_attention kept, one per shape: per batch bucket (up to 20) and per KV
# cache size (a process holds one engine when serving; a test session many)
RECOMPILE_LIMIT = 256
# BlockMask.from_kv_blocks(compute_q_blocks=False) (torch 2.9+): no backward-pass indices to sort
AVAILABLE = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


class FlexDecodeMetadata:
    """One decode step's inputs to every layer's attention: B rows in a graph (padded ones
    included), in an eager step the n real ones (the queries are padded to B in `attend`)."""

    def __init__(
        self,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_mask: BlockMask,
        num_slots: int,
        attention: Callable[..., torch.Tensor],
    ):
        self.positions = positions  # [B or n] position of each new token
        self.slot_mapping = slot_mapping  # [B or n] cache slot its K/V is written to (pads: the scratch slot)
        self.block_mask = block_mask  # row b: b's blocks of the cache, mask_mod: its positions in them
        self.num_slots = num_slots  # the blocks' slots (the scratch slot past them is left out)
        self.attention = attention  # flex_attention, compiled or not

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, Hkv, D]; k_cache/v_cache [slots, Hkv, D] of one layer → [B, Hq, D]."""
        k_cache[self.slot_mapping] = k
        v_cache[self.slot_mapping] = v
        keys = k_cache[: self.num_slots].permute(1, 0, 2)[None]  # [1, Hkv, slots, D], a view
        values = v_cache[: self.num_slots].permute(1, 0, 2)[None]  # [1, Hkv, slots, D]
        n, rows = q.shape[0], self.block_mask.kv_num_blocks.shape[0]
        if n < rows:  # an eager step: queries padded to the batch bucket (pad rows have no blocks)
            q = torch.cat([q, q.new_zeros(rows - n, *q.shape[1:])])
        gqa = keys.shape[1] != q.shape[1]
        out = self.attention(q[:, :, None], keys, values, block_mask=self.block_mask, enable_gqa=gqa)
        return out[:n, :, 0]  # [n, Hq, D]


class FlexDecode:
    """Static buffers of the block mask for decode steps of up to `max_batch` sequences.

    Row b of the mask lists b's pages (from the first its sliding window reaches, if any) as
    *partial* blocks: mask_mod is evaluated on every key, so FlexAttention's decoding kernel
    splits each sequence's own pages over the SMs. Passing full blocks as well would make it split
    the whole cache's length instead (the template's `TILE_KV` is cdiv(KV_LEN, SPLIT_KV) when
    there are full blocks), leaving one CTA per sequence and KV head to walk all its pages at low
    batch sizes; vLLM's FlexAttention backend passes none either."""

    def __init__(self, kv_cache: KVCache, max_batch: int, sliding_window: int | None, compile: bool):
        nb, bs, dev = kv_cache.num_blocks, kv_cache.block_size, kv_cache.k.device
        self.num_blocks, self.block_size, self.num_slots = nb, bs, nb * bs
        self.sliding_window = sliding_window
        self.kv_cache = kv_cache
        self.warm: set[int] = set()  # batch buckets whose kernel ran
        self.num_partial = torch.zeros(max_batch, 1, 1, dtype=torch.int32, device=dev)  # [B, 1, 1]
        self.partial = torch.zeros(max_batch, 1, 1, nb, dtype=torch.int32, device=dev)  # [B, 1, 1, blocks]
        self.tables = torch.zeros(max_batch, nb, dtype=torch.int32, device=dev)  # [B, blocks] block tables
        self.num_pages = torch.zeros(max_batch, dtype=torch.int32, device=dev)  # [B] blocks in each table
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=dev)  # [B]
        # [B, blocks + 1]: the logical index of each physical block in b's table, -1 where the
        # block is not b's; the last column takes the writes of table entries past b's length
        self.logical = torch.full((max_batch, nb + 1), -1, dtype=torch.int32, device=dev)
        self.block_ids = torch.arange(nb, dtype=torch.int32, device=dev)  # [blocks]
        self.attention: Callable[..., torch.Tensor] = flex_attention
        if compile:
            # one kernel per shape (the decoding kernel wants a static batch): dynamo's default of
            # 8 versions of a function would stop at the 9th batch bucket
            dynamo = torch._dynamo.config
            limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # < 2.7
            for name in (limit, "accumulated_recompile_limit"):
                if hasattr(dynamo, name):
                    setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
            self.attention = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        self.masks: dict[int, BlockMask] = {}
        logical, lens = self.logical, self.context_lens

        def mask_mod(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            block = logical[b, kv_idx // bs]
            pos = block * bs + kv_idx % bs  # the slot's position in sequence b
            keep = (block >= 0) & (pos < lens[b])
            if sliding_window is not None:
                keep = keep & (pos > lens[b] - 1 - sliding_window)
            return keep

        self.mask_mod = mask_mod

    def fill(self, tables: list[list[int]], context_lens: list[int], bsz: int, ctx: int) -> None:
        """Write the step's block tables, their pages in the window and the lengths into rows
        [:bsz] (pads: no blocks): array ops over the whole batch on the host (numpy: a few
        microseconds each where a small torch op costs ten), one copy each."""
        n, bs = len(tables), self.block_size
        lens = np.asarray(context_lens, dtype=np.int32)  # [n]
        pages = (lens + bs - 1) // bs  # [n] blocks each table uses
        width = int(pages.max())
        col = np.arange(width, dtype=np.int32)  # [width]
        table = padded_rows(tables, pages.tolist(), width).numpy()  # [n, width]
        first = np.zeros_like(pages)  # [n] the first page the window reaches
        if self.sliding_window is not None:
            first = np.maximum(lens - self.sliding_window, 0) // bs
        take = np.minimum(first[:, None] + col, width - 1)  # [n, width]
        window = np.where(col < (pages - first)[:, None], np.take_along_axis(table, take, 1), 0)  # [n, width]
        counts = np.zeros((3, bsz), dtype=np.int32)  # pages in the window, pages, lengths [bsz] each
        counts[0, :n], counts[1, :n], counts[2, :n] = pages - first, pages, lens
        counts_t = torch.from_numpy(counts)
        self.tables[:n, :width].copy_(torch.from_numpy(table), non_blocking=True)
        self.partial[:n, 0, 0, :width].copy_(torch.from_numpy(window), non_blocking=True)
        self.num_partial[:bsz, 0, 0].copy_(counts_t[0], non_blocking=True)
        self.num_pages[:bsz].copy_(counts_t[1], non_blocking=True)
        self.context_lens[:bsz].copy_(counts_t[2], non_blocking=True)

    def metadata(
        self, positions: torch.Tensor, slot_mapping: torch.Tensor, bsz: int, ctx: int
    ) -> FlexDecodeMetadata:
        """The step's metadata for rows [:bsz], after writing their physical → logical map (on the
        device, in the graph: a fill and one scatter of [bsz, blocks])."""
        valid = self.block_ids[None] < self.num_pages[:bsz, None]  # [bsz, blocks]
        target = torch.where(valid, self.tables[:bsz], self.num_blocks)  # [bsz, blocks]
        logical = self.logical[:bsz]
        logical.fill_(-1)
        logical.scatter_(1, target.long(), torch.where(valid, self.block_ids[None], -1))
        return FlexDecodeMetadata(
            positions, slot_mapping, self._block_mask(bsz), self.num_slots, self.attention
        )

    def _block_mask(self, bsz: int) -> BlockMask:
        """Rows [:bsz] as a block mask: views of the static buffers, made once per bucket."""
        if bsz not in self.masks:
            self.masks[bsz] = BlockMask.from_kv_blocks(
                self.num_partial[:bsz],
                self.partial[:bsz],
                BLOCK_SIZE=(Q_BLOCK, self.block_size),
                mask_mod=self.mask_mod,
                seq_lengths=(1, self.num_slots),
                compute_q_blocks=False,
            )
        return self.masks[bsz]

    def ready(self, bsz: int, num_heads: int) -> bool:
        """Run bucket bsz's attention once (compiling it) before a step uses it, so a kernel that
        fails to build is found before the step has written anything (or is captured): False then.
        Under inference_mode, as the model runs it: dynamo guards on it, and a probe in grad mode
        would compile a second version, the one the step then uses."""
        if bsz in self.warm:
            return True
        try:
            with torch.inference_mode():  # the tensors made as the model's step makes them
                keys = self.kv_cache.k[0][: self.num_slots].permute(1, 0, 2)[None]  # [1, Hkv, slots, D]
                values = self.kv_cache.v[0][: self.num_slots].permute(1, 0, 2)[None]
                q = keys.new_zeros(bsz, num_heads, 1, keys.shape[-1])  # [bsz, Hq, 1, D]: any will do
                gqa = num_heads != keys.shape[1]
                self.attention(q, keys, values, block_mask=self._block_mask(bsz), enable_gqa=gqa)
        except Exception as e:  # inductor's errors, and dynamo's recompile limit (not a RuntimeError)
            log.warning("decode attention: FlexAttention failed (%s); gathering each context instead", e)
            return False
        self.warm.add(bsz)
        return True
