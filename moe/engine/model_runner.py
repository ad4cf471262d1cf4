"""ModelRunner: the forward pass of one engine step, apart from the engine's bookkeeping.

It turns the scheduler's flat batch (sequences with how many of their tokens to compute) into
input ids and attention metadata, runs the model (two micro-batches when overlap is on, so the
router's attention overlaps remote experts), records what is now in the KV cache, and returns
the logits of the sequences whose prompt is complete (they sample this step); a sequence that
asked for its prompt's logprobs (echo) gets them from its prompt's rows. A step of decodes only
goes to the decode path when there is one (moe.engine.decode_path: CUDA graphs, FlexAttention over the
pages), invisible to the engine. Nothing here reads a device tensor on the host: the rows that
sample are known on the host and taken with one index_select per micro-batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moe.config import ModelConfig
from moe.engine.decode_path import DecodePath
from moe.engine.kv_cache import BlockManager, KVCache
from moe.engine.sequence import Sequence
from moe.expert_parallel.backend import ExpertBackend
from moe.layers.attention import AttentionMetadata
from moe.models.transformer import DenseModel

Scheduled = list[tuple[Sequence, int]]  # (sequence, tokens of it to compute this step)


@dataclass
class Pending:
    """A step's samples not yet processed on the host (async scheduling): the sequences that
    sampled, their ids [S] on the device, and the same ids on their way to the host."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [S] int64, on the device
    rows: dict[str, int]  # request id → its row in tokens
    host: torch.Tensor  # [S] int64, pinned on CUDA: filled by a copy queued after the sampling
    ready: torch.cuda.Event | None  # recorded after that copy (None on a CPU: already there)

    @classmethod
    def launch(cls, seqs: list[Sequence], tokens: torch.Tensor) -> Pending:
        """Queue the copy of tokens to the host behind the step's work; nothing waits for it."""
        rows = {s.request_id: i for i, s in enumerate(seqs)}
        if tokens.device.type != "cuda":
            return cls(seqs, tokens, rows, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(seqs, tokens, rows, host, ready)

    def token_list(self) -> list[int]:
        """The samples on the host: waits for this step's work only, not for later steps'."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


PROMPT_LOGITS_ROWS = 256  # prompt logprobs: logits of this many positions at once (256 x V floats)


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        model: DenseModel,
        experts: ExpertBackend,
        kv_cache: KVCache,
        blocks: BlockManager,
        overlap: bool = False,
        decode: DecodePath | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.experts = experts
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.overlap = overlap
        self.device = model.device
        self.decode = decode

    def execute(
        self, scheduled: Scheduled, pending: Pending | None = None
    ) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the model on the step's flat batch → (logits [S, V] for the S sequences that
        sample this step, those sequences). A sequence's pending sample (async scheduling) is
        taken from `pending`, the last step's sampled ids, on the device."""
        decode = self.decode
        if decode is not None and all(n == 1 and s.num_computed + 1 == len(s) for s, n in scheduled):
            seqs = [s for s, _ in scheduled]
            if decode.takes(len(seqs), max(len(s) for s in seqs)):
                tables = [self.blocks.tables[s.request_id] for s in seqs]
                logits = decode.run(self._input_ids(scheduled, pending), tables, [len(s) for s in seqs])
                for seq in seqs:
                    self._computed(seq, 1)
                return logits, seqs
        groups = self._micro_batches(scheduled)
        inputs = [(self._input_ids(group, pending), self._metadata(group)) for group in groups]
        hidden = self.model(inputs, self.kv_cache, self.experts)  # [T_m, H] each
        last, sampling = [], []
        for group, h in zip(groups, hidden, strict=True):
            row, rows = 0, []
            for seq, n in group:
                if seq.needs_prompt_logprobs:
                    for i in range(0, n, PROMPT_LOGITS_ROWS):  # logits [≤ rows, V] at a time
                        chunk = h[row + i : row + min(n, i + PROMPT_LOGITS_ROWS)]
                        seq.add_prompt_logprobs(self.model.compute_logits(chunk), seq.num_computed + i)
                row += n
                self._computed(seq, n)
                if seq.num_computed == len(seq):  # prompt fully in the cache: this step samples
                    rows.append(row - 1)
                    sampling.append(seq)
            if rows:
                last.append(h.index_select(0, torch.tensor(rows).to(self.device, non_blocking=True)))
        if not last:
            return torch.empty(0, self.cfg.vocab_size, device=self.device), sampling
        return self.model.compute_logits(torch.cat(last)), sampling  # [S, V]

    def _computed(self, seq: Sequence, n: int) -> None:
        """n more of seq's tokens are in the KV cache; full blocks get their prefix-cache names."""
        seq.num_computed += n
        self.name_full_blocks(seq)

    def name_full_blocks(self, seq: Sequence) -> None:
        """Prefix-cache names for seq's full blocks of tokens known on the host (a block ending
        in a pending sample is named when the sample is processed)."""
        known = min(seq.num_computed, seq.num_known)
        if self.blocks.num_unhashed(seq.request_id, known):
            self.blocks.cache_full_blocks(seq.request_id, seq.token_ids, known)

    def _input_ids(self, group: Scheduled, pending: Pending | None) -> torch.Tensor:
        """A micro-batch's input ids [T_m] on the device: the tokens known on the host, and
        each pending sample gathered from the last step's sampled ids (no host sync)."""
        for seq, _ in group:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
        if pending is not None and all(n == 1 and s.pending for s, n in group):  # decodes, all pending
            src = torch.tensor([pending.rows[s.request_id] for s, _ in group])
            return pending.tokens.index_select(0, src.to(self.device, non_blocking=True))  # [T]
        input_ids: list[int] = []
        at, rows = [], []  # where in the batch a pending sample goes, its row in the last step
        for seq, n in group:
            known = seq.known_tokens(seq.num_computed, seq.num_computed + n)
            input_ids.extend(known)
            if len(known) < n:  # the slice ends at the pending sample
                assert pending is not None and seq.pending == 1 and len(known) == n - 1
                at.append(len(input_ids))
                rows.append(pending.rows[seq.request_id])
                input_ids.append(0)
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)  # [T]
        if at:
            assert pending is not None
            src = torch.tensor(rows).to(self.device, non_blocking=True)
            ids.index_copy_(0, torch.tensor(at).to(self.device, non_blocking=True), pending.tokens[src])
        return ids

    def _metadata(self, group: Scheduled) -> AttentionMetadata:
        """A micro-batch's attention metadata."""
        return AttentionMetadata.build(
            [self.blocks.tables[s.request_id] for s, _ in group],
            [s.num_computed + n for s, n in group],
            [n for _, n in group],
            self.blocks.block_size,
            self.cfg.sliding_window,
            self.device,
        )

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
