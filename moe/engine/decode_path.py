"""The decode path: how a step of decodes only runs, decided once, with one fallback.

A decode step (one new token per sequence) has nothing data-dependent in its shapes once its
batch is padded to a bucket (1, 2, 4, 8, then multiples of 16): every tensor it reads can live in
static buffers (ids, positions, cache slots, the attention's block tables or gathered slots),
and the experts' grouped GEMMs keep their sizes on the device. `DecodePath.decide` chooses at
engine start, in one place:
- **graphs**: the padded step up to the logits captured once per bucket and replayed, as vLLM
  and nano-vllm do (a step of a few streams is a few hundred small kernels; launched one by one
  from Python the host would set the pace). It needs the whole step on this device with nothing
  that syncs the host: in-process, unsplit experts, no overlap, and a grouped GEMM that runs on
  the device: bf16 on SM90/SM100 (elsewhere torch's grouped GEMM reads its offsets on the host:
  graphs stay off, with a log line). `cuda_graphs=True` on a CPU runs the same padded step
  without capture: that is how the tests check it against the eager path on any machine.
- **attention**: FlexAttention over the KV pages in place (moe.layers.flex_decode; one graph per batch
  bucket; on CUDA only with pages of a multiple of 16 tokens, the least Triton's dot takes), or
  the dense gather of each context into [B, L], L a power of two (moe.layers.attention.DenseDecode,
  the reference: one graph per batch and context bucket).
- neither (a CPU by default): decode steps take the engine's general path, exact shapes
  (moe.layers.attention.AttentionMetadata), and `takes` says no.
Eager steps with FlexAttention (remote experts, float32 on CUDA) go through here too, padded to
a bucket, each micro-batch ("lane", two with overlap) with its own buffers.

One fallback, per batch bucket: a bucket whose FlexAttention kernel does not build gathers
instead, and a bucket whose capture fails runs its padded step eagerly; the other buckets keep
theirs. With FlexAttention every batch bucket is compiled and captured at start-up (`warm_up`),
largest first, as vLLM does: no compile or capture while serving (the gather's graphs, one per
batch and context bucket, are captured as their contexts first occur).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from moe.engine.kv_cache import KVCache
from moe.expert_parallel.backend import ExpertBackend, InProcessExperts
from moe.layers.attention import DenseDecode, decode_slots
from moe.layers.flex_decode import AVAILABLE as FLEX_AVAILABLE
from moe.layers.flex_decode import FlexDecode
from moe.models.transformer import DenseModel, Metadata

log = logging.getLogger(__name__)
GRAPH_CAPABILITIES = ((9, 0), (10, 0), (10, 3))  # torch's grouped GEMM runs on the device (bf16)
FLEX_PAGE_MULTIPLE = 16  # Triton's tl.dot needs K >= 16: FlexAttention's KV block is the page


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


def graphs_runnable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the decode step cannot be captured on this device, or None when it can."""
    if device.type != "cuda":
        return "not a CUDA device"
    if dtype != torch.bfloat16:
        return f"{dtype} experts: torch's grouped GEMM reads its offsets on the host"
    cap = torch.cuda.get_device_capability(device)
    if cap not in GRAPH_CAPABILITIES:
        return f"SM{cap[0]}{cap[1]}: torch's grouped GEMM reads its offsets on the host there"
    return None


def pick_attention(name: str, device: torch.device, block_size: int) -> str:
    """The decode attention for `attention_backend` (auto: flex on CUDA with pages of a multiple
    of 16 tokens and torch >= 2.9, else sdpa, the gather)."""
    if name not in ("auto", "flex", "sdpa"):
        raise ValueError(f"attention_backend must be auto, flex or sdpa, not {name!r}")
    if name == "flex" and not FLEX_AVAILABLE:
        log.warning("attention_backend flex needs torch >= 2.9 (torch %s): using sdpa", torch.__version__)
        return "sdpa"
    fits = block_size % FLEX_PAGE_MULTIPLE == 0
    if name == "flex" and device.type == "cuda" and not fits:
        raise ValueError(
            f"attention_backend flex on CUDA needs block_size a multiple of {FLEX_PAGE_MULTIPLE} "
            f"(Triton's kernel reads a page per block), not {block_size}"
        )
    if name == "auto":
        if device.type == "cuda" and FLEX_AVAILABLE and not fits:
            log.info("decode attention: the gather (block_size %d: FlexAttention needs 16s)", block_size)
        return "flex" if device.type == "cuda" and FLEX_AVAILABLE and fits else "sdpa"
    return name


class Lane:
    """Static buffers of one micro-batch of decode steps: ids, positions, cache slots [B], and
    its attention's (the gather's always: the reference and the fallback; FlexAttention's if on)."""

    def __init__(
        self,
        kv_cache: KVCache,
        max_batch: int,
        max_context: int,
        window: int | None,
        flex: bool,
        compile: bool,
    ):
        dev = kv_cache.k.device
        self.kv_cache = kv_cache
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)  # [B]
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)  # [B]
        self.slot_mapping = torch.zeros(max_batch, dtype=torch.long, device=dev)  # [B]
        self.dense = DenseDecode(kv_cache, max_batch, max_context, window)
        self.flex = FlexDecode(kv_cache, max_batch, window, compile) if flex else None

    def fill(
        self,
        token_ids: torch.Tensor | list[int],
        tables: list[list[int]],
        lens: list[int],
        bsz: int,
        ctx: int,
        flex: bool,
    ) -> None:
        """Write the step into rows [:bsz] (built on the host, one copy each; the ids [n] may
        already be on the device: the last step's samples, never read on the host); padded rows
        write their K/V to the scratch slot and attend to no real key."""
        n = len(token_ids)
        pad = bsz - n
        slots = decode_slots(tables, lens, self.kv_cache.block_size)
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        self.ids[:n].copy_(ids, non_blocking=True)
        if pad:
            self.ids[n:bsz].zero_()
        self.positions[:bsz].copy_(torch.tensor([c - 1 for c in lens] + [0] * pad), non_blocking=True)
        self.slot_mapping[:bsz].copy_(
            torch.tensor(slots + [self.kv_cache.scratch_slot] * pad), non_blocking=True
        )
        (self.flex if flex and self.flex is not None else self.dense).fill(tables, lens, bsz, ctx)

    def inputs(self, bsz: int, ctx: int, flex: bool, rows: int) -> tuple[torch.Tensor, Metadata]:
        """The model's input, views of the buffers: ids [rows] and their metadata. A graph takes
        every row of the bucket (rows = bsz); an eager step only the real ones, so padding never
        reaches the experts (remote ones, or their load counts); FlexAttention's block mask
        stays the bucket's (its kernel is the bucket's) and pads the queries itself."""
        ids, positions, slots = self.ids[:rows], self.positions[:rows], self.slot_mapping[:rows]
        if flex and self.flex is not None:
            return ids, self.flex.metadata(positions, slots, bsz, ctx)
        return ids, self.dense.metadata(positions, slots, rows, ctx)


class DecodePath:
    def __init__(
        self,
        model: DenseModel,
        experts: ExpertBackend,
        kv_cache: KVCache,
        max_batch: int,
        max_model_len: int,
        graphs: bool,
        capture: bool,
        attention: str,
        lanes: int = 1,
    ):
        self.model, self.experts, self.kv_cache = model, experts, kv_cache
        self.graphs, self.capture, self.attention = graphs, capture, attention
        self.batches = batch_buckets(max_batch)
        self.contexts = context_buckets(max_model_len)
        window, flex = model.cfg.sliding_window, attention == "flex"
        compile_flex = flex and model.device.type == "cuda"
        self.lanes = [
            Lane(kv_cache, self.batches[-1], self.contexts[-1], window, flex, compile_flex)
            for _ in range(lanes)
        ]
        self.gather: set[int] = set()  # batch buckets whose FlexAttention did not build: they gather
        self.eager: set[tuple[int, int]] = set()  # (batch, context) buckets whose capture failed
        self.cuda_graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}  # (graph, logits [B, V])
        self.pool: Any = None  # the graphs share one memory pool
        self.steps = 0  # decode steps run here

    @classmethod
    def decide(
        cls,
        model: DenseModel,
        experts: ExpertBackend,
        kv_cache: KVCache,
        max_batch: int,
        max_model_len: int,
        cuda_graphs: bool | None,
        attention_backend: str,
        overlap: bool,
    ) -> DecodePath | None:
        """The engine's decode path, or None when decode steps take the general path."""
        device, dtype = model.device, model.dtype
        attention = pick_attention(attention_backend, device, kv_cache.block_size)
        unsplit = isinstance(experts, InProcessExperts) and len(experts.shards) <= 1
        graphs = cuda_graphs
        if graphs is None:
            why = graphs_runnable(device, dtype)
            if why is None and not (unsplit and not overlap):
                why = "the experts are remote or split, or micro-batches overlap: the step syncs"
            if why is not None and device.type == "cuda":
                log.info("decode CUDA graphs off (%s): decode steps run eagerly", why)
            graphs = why is None
        elif graphs and (not unsplit or overlap):
            raise ValueError("cuda_graphs needs the experts in this process, unsplit, and overlap off")
        if not graphs and attention != "flex":
            return None
        return cls(
            model,
            experts,
            kv_cache,
            max_batch,
            max_model_len,
            graphs,
            graphs and device.type == "cuda",
            attention,
            2 if overlap and not graphs else 1,
        )

    @property
    def attention_backend(self) -> str:
        return self.attention

    def takes(self, num_seqs: int, max_context: int) -> bool:
        return num_seqs <= self.batches[-1] and max_context <= self.contexts[-1]

    def run(
        self, token_ids: torch.Tensor | list[int], tables: list[list[int]], context_lens: list[int]
    ) -> torch.Tensor:
        """The step of sequences whose last token (token_ids[b] [n], at position
        context_lens[b] - 1) is new → their logits [n, V] in float32."""
        self.steps += 1
        if len(self.lanes) == 1 or len(token_ids) < 2:
            parts = [(0, len(token_ids))]
        else:
            half = (len(token_ids) + 1) // 2
            parts = [(0, half), (half, len(token_ids))]
        batches, sizes = [], []
        for lane, (a, b) in zip(self.lanes, parts, strict=False):
            bsz, ctx, flex = self._bucket(b - a, context_lens[a:b])
            lane.fill(token_ids[a:b], tables[a:b], context_lens[a:b], bsz, ctx, flex)
            batches.append((lane, bsz, ctx, flex))
            sizes.append(b - a)
        if self.graphs and len(batches) == 1:
            _, bsz, ctx, flex = batches[0]
            replayed = self._replay(bsz, ctx, flex)
            if replayed is not None:
                return replayed[: sizes[0]]
        hidden = self.model(
            [
                lane.inputs(bsz, ctx, flex, n)
                for (lane, bsz, ctx, flex), n in zip(batches, sizes, strict=True)
            ],
            self.kv_cache,
            self.experts,
        )
        return self.model.compute_logits(torch.cat(hidden))  # [n, V]

    def _bucket(self, n: int, lens: list[int]) -> tuple[int, int, bool]:
        """(batch bucket, context bucket (the gather's; 0 with FlexAttention), FlexAttention?)."""
        bsz = smallest_fit(self.batches, n)
        flex = self.attention == "flex" and bsz not in self.gather and self._flex_ready(bsz)
        return bsz, 0 if flex else smallest_fit(self.contexts, max(lens)), flex

    def _flex_ready(self, bsz: int) -> bool:
        """Whether bucket bsz's FlexAttention kernel builds (run once, in every lane, before a step
        writes anything); a bucket whose kernel does not gathers from then on."""
        heads = self.model.cfg.num_attention_heads
        if all(lane.flex is not None and lane.flex.ready(bsz, heads) for lane in self.lanes):
            return True
        self.gather.add(bsz)
        return False

    def _replay(self, bsz: int, ctx: int, flex: bool) -> torch.Tensor | None:
        """Run the filled step from its graph (captured now if it is not yet) → logits [bsz, V];
        None when this bucket runs eagerly (no capture, or its capture failed)."""
        key = (bsz, ctx)
        if not self.capture or key in self.eager:
            return self.step(bsz, ctx, flex)
        if key not in self.cuda_graphs:
            try:
                self.cuda_graphs[key] = self._capture(bsz, ctx, flex)
            except Exception as e:  # a kernel that cannot be captured: this bucket runs eagerly
                log.warning(
                    "decode CUDA graph for batch %d, context %d failed (%s): that bucket runs eagerly",
                    bsz,
                    ctx,
                    e,
                )
                self.eager.add(key)
                return None
        graph, logits = self.cuda_graphs[key]
        graph.replay()
        return logits

    def step(self, bsz: int, ctx: int, flex: bool) -> torch.Tensor:
        """The padded step of the first lane, reading only its static buffers → logits [bsz, V]:
        what a graph captures (tests trace it with torch.compile(fullgraph=True): it has no host
        sync and no data-dependent shape)."""
        lane = self.lanes[0]
        return self.model.compute_logits(
            self.model([lane.inputs(bsz, ctx, flex, bsz)], self.kv_cache, self.experts)[0]
        )

    def _capture(self, bsz: int, ctx: int, flex: bool) -> tuple[Any, torch.Tensor]:
        """Warm up on a side stream (lazy initialisations stay out of the graph), then capture.
        The buffers hold this step's real inputs: the warm-up writes the same K/V the replay will."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step(bsz, ctx, flex)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(bsz, ctx, flex)
        self.pool = graph.pool()
        return graph, logits

    def warm_up(self) -> None:
        """Compile (FlexAttention) and capture (graphs) every batch bucket before serving, largest
        first (the smaller ones then reuse its memory pool), logged as it goes. The gather's
        graphs depend on the context too: they are captured as their contexts first occur."""
        if self.attention != "flex":
            return
        start, lane = time.perf_counter(), self.lanes[0]
        for k, bsz in enumerate(reversed(self.batches), 1):
            flex = self._flex_ready(bsz)
            captured = False
            if self.capture and flex:
                lane.fill([0], [[0]], [1], bsz, 0, flex)  # any step: slot 0 of block 0, then pads
                lane.slot_mapping[:bsz].fill_(self.kv_cache.scratch_slot)  # it writes no real slot
                captured = self._replay(bsz, 0, flex) is not None
            log.info(
                "decode path: batch %d ready (%d/%d: %s%s, %.1fs)",
                bsz,
                k,
                len(self.batches),
                "FlexAttention" if flex else "its kernel did not build, gathering",
                ", graph captured" if captured else "",
                time.perf_counter() - start,
            )
