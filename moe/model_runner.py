"""ModelRunner: the forward pass of one engine step, apart from the engine's bookkeeping.

It turns the scheduler's flat batch (sequences with how many of their tokens to compute) into
input ids and attention metadata, runs the model (two micro-batches through the overlap driver
when asked, so the router's attention overlaps remote experts), records what is now in the KV
cache, and returns the logits of the sequences whose prompt is complete (they sample this
step); a sequence that asked for its prompt's logprobs (echo) gets them from its prompt's rows.
A step of decodes only goes through moe.cuda_graph when it is on (by default on CUDA with
the experts in this process): captured once per bucket, then replayed, invisible to the engine.
Other decode-only steps (remote experts, float32) read the KV pages in place with FlexAttention
when `decode_attention` is given (moe.flex_decode); prefill and mixed steps gather each context.
"""

from __future__ import annotations

import time

import torch

from moe.attention import AttentionMetadata, decode_slots
from moe.backend import ExpertBackend
from moe.config import ModelConfig
from moe.cuda_graph import DecodeGraphs, batch_buckets, smallest_fit
from moe.flex_decode import FlexDecode, FlexDecodeMetadata
from moe.kv_cache import BlockManager, KVCache
from moe.model import MixtralDense
from moe.overlap import forward_overlapped
from moe.sequence import Sequence

Scheduled = list[tuple[Sequence, int]]  # (sequence, tokens of it to compute this step)
PROMPT_LOGITS_ROWS = 256  # prompt logprobs: logits of this many positions at once (256 x V floats)


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        model: MixtralDense,
        experts: ExpertBackend,
        kv_cache: KVCache,
        blocks: BlockManager,
        overlap: bool = False,
        decode_graphs: DecodeGraphs | None = None,
        decode_attention: list[FlexDecode] | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.experts = experts
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.overlap = overlap
        self.device = model.device
        self.decode_graphs = decode_graphs
        # eager decode-only steps (no graphs: remote experts, float32): FlexAttention over the
        # pages, one set of buffers per micro-batch; None: the dense gather of AttentionMetadata
        self.decode_attention = decode_attention
        self.batches = batch_buckets(decode_attention[0].max_batch) if decode_attention else []

    def execute(self, scheduled: Scheduled) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the model on the step's flat batch → (logits [S, V] for the S sequences that
        sample this step, those sequences)."""
        graphs = self.decode_graphs
        if graphs is not None and all(n == 1 and s.num_computed + 1 == len(s) for s, n in scheduled):
            seqs = [s for s, _ in scheduled]
            if graphs.fits(len(seqs), max(len(s) for s in seqs)):
                tables = [self.blocks.tables[s.request_id] for s in seqs]
                logits = graphs.run([s.token_ids[-1] for s in seqs], tables, [len(s) for s in seqs])
                for seq in seqs:
                    self._computed(seq, 1)
                return logits, seqs
        groups = self._micro_batches(scheduled)
        inputs = [self._inputs(group, m) for m, group in enumerate(groups)]  # ([T_m] ids, metadata) each
        if len(inputs) == 1:
            hidden = [self.model(*inputs[0], self.kv_cache, self.experts)]  # [T, H]
        else:
            hidden = forward_overlapped(self.model, inputs, self.kv_cache, self.experts)  # [T_m, H] each
        last, sampling = [], []
        for group, h, (_, meta) in zip(groups, hidden, inputs, strict=True):
            row = 0
            for b, (seq, n) in enumerate(group):
                if seq.needs_prompt_logprobs:
                    for i in range(0, n, PROMPT_LOGITS_ROWS):  # logits [≤ rows, V] at a time
                        rows = h[row + i : row + min(n, i + PROMPT_LOGITS_ROWS)]
                        seq.add_prompt_logprobs(self.model.compute_logits(rows), seq.num_computed + i)
                row += n
                self._computed(seq, n)
                if seq.num_computed == len(seq):  # prompt fully in the cache: this step samples
                    last.append(h[meta.last_index[b]])
                    sampling.append(seq)
        if not last:
            return torch.empty(0, self.cfg.vocab_size, device=self.device), sampling
        return self.model.compute_logits(torch.stack(last)), sampling  # [S, V]

    def _computed(self, seq: Sequence, n: int) -> None:
        """n more of seq's tokens are in the KV cache; full blocks get their prefix-cache names."""
        seq.num_computed += n
        if self.blocks.num_unhashed(seq.request_id, seq.num_computed):
            self.blocks.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed)

    def _inputs(
        self, group: Scheduled, m: int
    ) -> tuple[torch.Tensor, AttentionMetadata | FlexDecodeMetadata]:
        """Micro-batch m's input ids [T_m] and attention metadata."""
        input_ids: list[int] = []
        for seq, n in group:
            input_ids.extend(seq.token_ids[seq.num_computed : seq.num_computed + n])
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)  # [T]
        if self.decode_attention is not None and all(
            n == 1 and s.num_computed + 1 == len(s) for s, n in group
        ):
            flex = self._flex_metadata([s for s, _ in group], self.decode_attention[m])
            if flex is not None:
                return ids, flex
        meta = AttentionMetadata.build(
            [self.blocks.tables[s.request_id] for s, _ in group],
            [s.num_computed + n for s, n in group],
            [n for _, n in group],
            self.blocks.block_size,
            self.cfg.sliding_window,
            self.device,
        )
        return ids, meta

    def _flex_metadata(self, seqs: list[Sequence], flex: FlexDecode) -> FlexDecodeMetadata | None:
        """A decode-only micro-batch's metadata for FlexAttention (its block mask padded to a
        batch bucket, so a kernel is built per bucket); None if its kernel does not build (then
        every later step gathers)."""
        tables = [self.blocks.tables[s.request_id] for s in seqs]
        lens = [len(s) for s in seqs]
        bsz = smallest_fit(self.batches, len(seqs))
        flex.fill(tables, lens, bsz, 0)
        positions = torch.tensor([c - 1 for c in lens]).to(self.device, non_blocking=True)  # [n]
        slots = torch.tensor(decode_slots(tables, lens, self.blocks.block_size)).to(
            self.device, non_blocking=True
        )
        if not flex.ready(bsz, self.cfg.num_attention_heads):
            self.decode_attention = None
            return None
        return flex.metadata(positions, slots, bsz, 0)

    def _micro_batches(self, scheduled: Scheduled) -> list[Scheduled]:
        """Two halves of about equal token counts when overlap is on, else one batch."""
        if not self.overlap or len(scheduled) < 2:
            return [scheduled]
        total, acc = sum(n for _, n in scheduled), 0
        for k, (_, n) in enumerate(scheduled):
            acc += n
            if acc * 2 >= total:
                cut = min(max(k + 1, 1), len(scheduled) - 1)
                return [scheduled[:cut], scheduled[cut:]]
        return [scheduled]
