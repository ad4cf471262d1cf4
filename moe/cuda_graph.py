"""Decode steps replayed from CUDA graphs, as vLLM and nano-vllm do.

A decode step of a few streams is a few hundred small kernels; launched one by one from Python
the host, not the GPU, sets the pace. A step of decodes only (one new token per sequence, in-
process experts) has nothing data-dependent in its shapes once its batch is padded to a bucket
(1, 2, 4, 8, then multiples of 16): every tensor it reads lives in static buffers (ids,
positions, cache slots, the attention's block tables or gathered slots), the experts' grouped
GEMMs keep their sizes on the device, and the whole step up to the logits is captured once per
bucket and replayed. Prefill and mixed steps stay eager.

The decode attention is FlexAttention over the pages in place (moe.flex_decode: one graph per
batch bucket), or the reference that gathers each context into [B, L] with L padded to a
power of two (moe.attention.DenseDecode: one graph per batch and context bucket). Padded rows
write their K/V to the cache's scratch slot and attend to no real key. With `capture`
off (CPU) the same padded step runs eagerly: that is how the tests check it against the eager
path on any machine.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from moe.attention import DenseDecode, decode_slots
from moe.backend import ExpertBackend
from moe.flex_decode import FlexDecode
from moe.kv_cache import KVCache
from moe.model import MixtralDense

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16, up to the first that holds `max_batch`."""
    out = [1]
    while out[-1] < max_batch:
        out.append(out[-1] * 2 if out[-1] < 16 else out[-1] + 16)
    return out


def context_buckets(max_len: int, smallest: int = 128) -> list[int]:
    """Powers of two from `smallest`, the last one ≥ `max_len`."""
    out = [smallest]
    while out[-1] < max_len:
        out.append(out[-1] * 2)
    return out


def smallest_fit(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class DecodeGraphs:
    """Static buffers and one captured graph per bucket, made on first use.

    The decode attention's own buffers are `attention`'s: moe.flex_decode.FlexDecode (the pages
    read in place; one graph per batch bucket) or moe.attention.DenseDecode (each context
    gathered, the reference; one per batch and context bucket)."""

    def __init__(
        self,
        model: MixtralDense,
        experts: ExpertBackend,
        kv_cache: KVCache,
        max_batch: int,
        max_model_len: int,
        sliding_window: int | None,
        capture: bool,
        attention: str = "sdpa",
    ):
        self.model, self.experts, self.kv_cache = model, experts, kv_cache
        self.block_size = kv_cache.block_size
        self.sliding_window = sliding_window
        self.capture = capture
        self.batches = batch_buckets(max_batch)
        self.contexts = context_buckets(max_model_len)
        b, dev = self.batches[-1], model.device
        self.ids = torch.zeros(b, dtype=torch.long, device=dev)  # [B]
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)  # [B]
        self.slot_mapping = torch.zeros(b, dtype=torch.long, device=dev)  # [B]
        self.attention: DenseDecode | FlexDecode = self._attention(attention)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # the graphs share one memory pool
        self.steps = 0  # decode steps run here (replayed, or padded and eager without capture)

    def _attention(self, name: str) -> DenseDecode | FlexDecode:
        b = self.batches[-1]
        if name == "flex":
            # compiled on CUDA (the fused kernel); on the CPU its reference path checks the mask
            return FlexDecode(self.kv_cache, b, self.sliding_window, compile=self.model.device.type == "cuda")
        return DenseDecode(self.kv_cache, b, self.contexts[-1], self.sliding_window)

    @property
    def attention_backend(self) -> str:
        return "flex" if isinstance(self.attention, FlexDecode) else "sdpa"

    def fits(self, num_seqs: int, max_context: int) -> bool:
        return num_seqs <= self.batches[-1] and max_context <= self.contexts[-1]

    def run(
        self, token_ids: list[int], block_tables: list[list[int]], context_lens: list[int]
    ) -> torch.Tensor:
        """The step of sequences whose last token (token_ids[b], at position context_lens[b] - 1)
        is new → their logits [b, V] in float32."""
        n = len(token_ids)
        bsz = smallest_fit(self.batches, n)
        if isinstance(self.attention, FlexDecode) and not self.attention.ready(
            bsz, self.model.cfg.num_attention_heads
        ):
            self.attention, self.graphs = self._attention("sdpa"), {}  # the kernel did not build
        ctx = smallest_fit(self.contexts, max(context_lens)) if self.attention.context_buckets else 0
        self._fill(token_ids, block_tables, context_lens, bsz, ctx)
        self.steps += 1
        if self.capture and (bsz, ctx) not in self.graphs:
            try:
                self.graphs[bsz, ctx] = self._capture(bsz, ctx)
            except RuntimeError as e:  # something in the step syncs the host: stay eager
                log.warning("decode CUDA graphs off: capture failed (%s); decode steps run eagerly", e)
                self.capture = False
        if not self.capture:
            return self._forward(bsz, ctx)[:n]
        graph, logits = self.graphs[bsz, ctx]
        graph.replay()
        return logits[:n]

    def _fill(
        self, token_ids: list[int], tables: list[list[int]], context_lens: list[int], bsz: int, ctx: int
    ) -> None:
        """Write the step into the static buffers' first bsz rows (built on the host, one copy each);
        padded rows write their K/V to the scratch slot."""
        pad = bsz - len(token_ids)
        positions = [c - 1 for c in context_lens]
        slots = decode_slots(tables, context_lens, self.block_size)
        self.ids[:bsz].copy_(torch.tensor(token_ids + [0] * pad), non_blocking=True)
        self.positions[:bsz].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:bsz].copy_(
            torch.tensor(slots + [self.kv_cache.scratch_slot] * pad), non_blocking=True
        )
        self.attention.fill(tables, context_lens, bsz, ctx)

    def _forward(self, bsz: int, ctx: int) -> torch.Tensor:
        """The step itself, reading only the static buffers → logits [bsz, V]."""
        meta = self.attention.metadata(self.positions[:bsz], self.slot_mapping[:bsz], bsz, ctx)
        hidden = self.model(self.ids[:bsz], meta, self.kv_cache, self.experts)  # [bsz, H]
        return self.model.compute_logits(hidden)  # [bsz, V]

    def _capture(self, bsz: int, ctx: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (lazy initialisations stay out of the graph), then capture.
        The buffers hold this step's real inputs: the warm-up writes the same K/V the replay will."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bsz, ctx)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bsz, ctx)
        self.pool = graph.pool()
        log.info("captured a decode CUDA graph: batch %d, context %d", bsz, ctx)
        return graph, logits
