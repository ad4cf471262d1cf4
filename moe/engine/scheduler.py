"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step takes the running sequences first (one token each at decode, or the next chunk of a
long prompt), then admits waiting ones while the token budget, `max_num_seqs` and the free KV
blocks allow. Prefill and decode share one flat batch. When the KV cache is full, the most
recently arrived running sequence is preempted: its blocks are freed and it is recomputed
later from its tokens so far (vLLM's recompute preemption). With prefix caching, a sequence
admitted with a cached prefix starts computing after it. With async scheduling a running
sequence may have a pending sample (moe.engine.sequence): it is scheduled as its next input,
unless that sample is its last by length.
"""

from __future__ import annotations

from collections import deque

from moe.engine.kv_cache import BlockManager
from moe.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int = 0
    ):
        self.blocks = blocks
        self.max_model_len = max_model_len or 1 << 62
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """→ [(sequence, number of its tokens to compute this step)], in batch order."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0 or seq.stops_by_length(self.max_model_len):
                continue  # (its pending sample ends it: nothing more to compute)
            n = min(len(seq) - seq.num_computed, budget)
            while not self.blocks.can_allocate(seq.request_id, seq.num_computed + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.blocks.allocate(seq.request_id, seq.num_computed + n)
            scheduled.append((seq, n))
            budget -= n
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # [] unless prefix caching is on; a prompt whose logprobs are asked runs whole
            hit = [] if seq.needs_prompt_logprobs else self.blocks.cached_prefix(seq.token_ids)
            start = len(hit) * self.blocks.block_size
            n = min(len(seq) - start, budget)
            if not self.blocks.can_allocate(seq.request_id, start + n, hit):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.request_id, start + n, hit)
            self.blocks.record_prompt(len(seq), start)
            seq.num_computed = seq.num_cached = start
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq.request_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that finished or was aborted, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq.request_id)
        seq.status = Status.FINISHED
