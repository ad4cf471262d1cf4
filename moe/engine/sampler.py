"""Sampler: the step's batched choice of one token per sequence (the engine's third stage).

Built from the operations of moe.sampling (penalties, filters, the inverse-CDF draw) and the
grammar masks of moe.guided, applied only to the rows that need them.
"""

from __future__ import annotations

import functools

import torch

from moe.engine.sequence import Sequence
from moe.guided import apply_bitmask
from moe.sampling import draw_ids, filter_probs, process_logits

ALTERNATIVES = 8  # near the budget: allowed tokens tried, most likely first, before the closing path


def _alternatives(row: torch.Tensor) -> list[int]:
    """The most likely allowed tokens of a masked logits row [V], most likely first."""
    top = torch.topk(row, min(ALTERNATIVES, row.shape[0]))
    return [t for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True) if v > float("-inf")]


class Sampler:
    """logits [S, V] of the sequences that sample this step → one token each, batched:
    per-request logits processing only where it changes something, the grammar masks of the
    guided rows, one argmax for the greedy rows, one softmax and one inverse-CDF draw for the
    random rows (filters applied per row where asked)."""

    def __init__(self, eos_token_ids: list[int], vocab_size: int):
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        needs = [i for i, s in enumerate(seqs) if s.params.needs_processing(s.num_output_tokens)]
        if not needs and all(s.params.greedy and s.matcher is None for s in seqs):
            return logits.argmax(dim=-1).tolist()  # every row greedy: one argmax, no row gather
        if needs:
            logits = logits.clone()
            for i in needs:
                seq, p = seqs[i], seqs[i].params
                stop_ids = ([] if p.ignore_eos else self.eos_token_ids) + p.stop_token_ids
                logits[i] = process_logits(logits[i], p, seq.prompt_token_ids, seq.output_token_ids, stop_ids)
        guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if guided:
            logits = self._apply_grammars(
                logits if needs else logits.clone(), [seqs[i] for i in guided], guided
            )
        tokens: list[int] = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True):
                tokens[i] = t
        rand = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rand:
            for i, t in zip(rand, self._draw(logits, seqs, rand).tolist(), strict=True):
                tokens[i] = t
        for i in guided:  # structured output must close within max_tokens (moe.guided)
            matcher = seqs[i].matcher
            assert matcher is not None
            tokens[i] = matcher.fit_budget(tokens[i], functools.partial(_alternatives, logits[i]))
        return tokens

    def sample_ids(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """For plain sequences (Sequence.plain: no grammar, processing or logprobs): the same
        choice as __call__, as ids [S] on the device, with no host sync (async scheduling)."""
        ids = logits.argmax(dim=-1)  # [S]: the greedy rows' choice
        rand = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rand:
            ids.index_copy_(
                0, torch.tensor(rand).to(logits.device, non_blocking=True), self._draw(logits, seqs, rand)
            )
        return ids

    @staticmethod
    def _draw(logits: torch.Tensor, seqs: list[Sequence], rand: list[int]) -> torch.Tensor:
        """The random rows' tokens [R], on the device: temperature, softmax, each row's filters
        where asked, one inverse-CDF draw (a row with a seed from its own generator)."""
        temps = torch.tensor([seqs[i].params.temperature for i in rand]).to(logits.device, non_blocking=True)
        probs = torch.softmax(logits[rand] / temps[:, None], dim=-1)  # [R, V]
        for r, i in enumerate(rand):
            p = seqs[i].params
            if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
                probs[r] = filter_probs(probs[r], p)
        return draw_ids(probs, [seqs[i].generator for i in rand])

    def _apply_grammars(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
        """Mask the tokens each guided row's grammar forbids (after the other processing, so a
        penalty or bias can never revive one). A row that processing left with nothing allowed
        (min_tokens hiding the EOS the grammar now requires) keeps the grammar's choice alone."""
        width = (self.vocab_size + 31) // 32
        bitmask = torch.empty(len(rows), width, dtype=torch.int32)  # [G, ceil(V/32)], filled by llguidance
        for r, seq in enumerate(seqs):
            seq.matcher.fill_bitmask(bitmask[r])  # type: ignore[union-attr]
        sub = logits[rows]  # [G, V]
        apply_bitmask(sub, bitmask)
        stuck = ~torch.isfinite(sub).any(dim=-1)
        if bool(stuck.any()):
            raw = torch.zeros_like(sub[stuck])
            apply_bitmask(raw, bitmask[stuck.cpu()])
            sub[stuck] = raw
        logits[rows] = sub
        return logits
