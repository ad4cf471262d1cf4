"""The engine: continuous batching over the dense model and an injected expert backend.

`step()` is the whole loop body: schedule → run the flat batch → sample → process outputs.
Requests join (`add_request`) and leave (finish, `abort_request`) between steps; their KV
blocks go back to the pool when they leave. The engine is single-threaded: whoever drives it
(a test, the benchmark, the router deployment) calls these methods from one thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.attention import AttentionMetadata
from moe.backend import ExpertBackend, InProcessExperts
from moe.checkpoint import CheckpointReader, parse_dtype
from moe.config import MixtralConfig
from moe.errors import OverloadedError, RequestError
from moe.guided import GrammarTokenizer, apply_bitmask
from moe.kv_cache import BlockManager, KVCache
from moe.model import MixtralDense
from moe.sampling import SamplingParams, draw, filter_probs, logprobs_of, process_logits
from moe.scheduler import Scheduler
from moe.sequence import RequestOutput, Sequence, Status
from moe.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_memory_bytes: int = 512 * 2**20
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_bytes
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on GPU
    device: str = "auto"  # auto: cuda if available, else cpu
    tokenizer_mode: str = "auto"
    overlap: bool = False  # two micro-batches per step, so attention overlaps remote experts
    max_queued_requests: int = 1024  # waiting requests beyond the running batch; more are refused
    enable_prefix_caching: bool = True  # reuse the KV blocks of shared prompt prefixes


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, cfg: MixtralConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype)
    return parse_dtype(cfg.torch_dtype) if device.type == "cuda" else torch.float32


class LLMEngine:
    def __init__(
        self,
        cfg: MixtralConfig,
        model: MixtralDense,
        experts: ExpertBackend,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
        model_dir: str | Path | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.experts = experts
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.device = model.device
        bs = config.block_size
        max_len = config.max_model_len or cfg.max_position_embeddings
        blocks_for_all = config.max_num_seqs * -(-max_len // bs)
        by_memory = config.kv_cache_memory_bytes // KVCache.bytes_per_block(cfg, bs, model.dtype)
        num_blocks = config.num_kv_blocks or min(blocks_for_all, by_memory)
        self.max_model_len = min(max_len, num_blocks * bs)
        if self.max_model_len < max_len:
            log.warning("KV cache holds %d tokens: max_model_len lowered to that", self.max_model_len)
        self.kv_cache = KVCache(cfg, num_blocks, bs, model.dtype, self.device)
        self.blocks = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        eos = list(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.vocab_size = cfg.vocab_size
        self.model_dir = model_dir
        self._grammar_tokenizer: GrammarTokenizer | None = None

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, config: EngineConfig | None = None, num_shards: int = 1
    ) -> LLMEngine:
        """All of a checkpoint in this process: the dense part plus every expert."""
        config = config or EngineConfig()
        cfg = MixtralConfig.from_pretrained(model_dir)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, cfg, device)
        reader = CheckpointReader(model_dir)
        model = MixtralDense.from_checkpoint(reader, cfg, dtype, device)
        experts = InProcessExperts.from_checkpoint(reader, cfg, dtype, device, num_shards)
        return cls(cfg, model, experts, config, load_tokenizer(model_dir, config.tokenizer_mode), model_dir)

    # ---- requests in and out ----

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if len(self.scheduler.waiting) >= self.config.max_queued_requests:
            raise OverloadedError(
                f"The server is at capacity ({len(self.scheduler.running)} running, "
                f"{len(self.scheduler.waiting)} waiting). Please retry shortly."
            )
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already running", param="request_id")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        params.validate(self.vocab_size)
        n = len(prompt_token_ids)
        if n + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the messages, {params.max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer", param="stop")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
        seq = Sequence(request_id, list(prompt_token_ids), params, gen, detok)
        if params.grammar is not None:
            seq.matcher = self.grammar_tokenizer().matcher(params.grammar)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. False if it is not (any longer) here."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return True

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The vocabulary for guided decoding, built on the first request that needs it."""
        if self._grammar_tokenizer is None:
            if self.model_dir is None:
                raise RequestError(
                    "guided decoding needs the engine's model directory", param="response_format"
                )
            self._grammar_tokenizer = GrammarTokenizer(self.model_dir, self.vocab_size, self.eos_token_ids[0])
        return self._grammar_tokenizer

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, Any]:
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage_perc": self.blocks.usage(),
            "num_used_kv_blocks": self.blocks.num_used_blocks,
            "num_kv_blocks": self.blocks.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.blocks.prefix_cache_queries,
            "prefix_cache_hits": self.blocks.prefix_cache_hits,
        }

    # ---- the loop ----

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits, sampling = self.execute(scheduled)
        outputs = []
        for row, (seq, token) in enumerate(zip(sampling, self.sample(logits, sampling), strict=True)):
            self._append_token(seq, token, logits[row])
            outputs.append(self._output(seq))
            if seq.finished:
                self.seqs.pop(seq.request_id, None)
        return outputs

    def execute(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the model on the step's flat batch → (logits [S, V] for the S sequences that
        sample this step, those sequences)."""
        groups = self._micro_batches(scheduled)
        micro = []
        for group in groups:
            input_ids: list[int] = []
            for seq, n in group:
                input_ids.extend(seq.token_ids[seq.num_computed : seq.num_computed + n])
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.monotonic()
            meta = AttentionMetadata.build(
                [self.blocks.tables[s.request_id] for s, _ in group],
                [s.num_computed + n for s, n in group],
                [n for _, n in group],
                self.blocks.block_size,
                self.cfg.sliding_window,
                self.device,
            )
            micro.append((torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True), meta))
        hidden = self.model(micro, self.kv_cache, self.experts)  # [T_m, H] per micro-batch
        last, sampling = [], []
        for group, h, (_, meta) in zip(groups, hidden, micro, strict=True):
            for b, (seq, n) in enumerate(group):
                seq.num_computed += n
                if self.blocks.num_unhashed(seq.request_id, seq.num_computed):
                    self.blocks.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed)
                if seq.num_computed == len(seq):  # prompt fully in the cache: this step samples
                    last.append(h[meta.last_index[b]])
                    sampling.append(seq)
        if not last:
            return torch.empty(0, self.vocab_size, device=self.device), sampling
        return self.model.compute_logits(torch.stack(last)), sampling  # [S, V]

    def _micro_batches(self, scheduled: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        """Two halves of about equal token counts when overlap is on, else one batch."""
        if not self.config.overlap or len(scheduled) < 2:
            return [scheduled]
        total, acc = sum(n for _, n in scheduled), 0
        for k, (_, n) in enumerate(scheduled):
            acc += n
            if acc * 2 >= total:
                cut = min(max(k + 1, 1), len(scheduled) - 1)
                return [scheduled[:cut], scheduled[cut:]]
        return [scheduled]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [S, V] → one token per sequence, batched: per-request logits processing only
        where it changes something, one argmax for the greedy rows, one softmax and one
        exponential-race draw for the random rows (filters applied per row where asked)."""
        needs = [i for i, s in enumerate(seqs) if s.params.needs_processing(s.num_output_tokens)]
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
            temps = torch.tensor([seqs[i].params.temperature for i in rand], device=logits.device)
            probs = torch.softmax(logits[rand] / temps[:, None], dim=-1)  # [R, V]
            for r, i in enumerate(rand):
                p = seqs[i].params
                if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
                    probs[r] = filter_probs(probs[r], p)
            for i, t in zip(rand, draw(probs, [seqs[i].generator for i in rand]), strict=True):
                tokens[i] = t
        return tokens

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

    def _append_token(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        p = seq.params
        seq.output_token_ids.append(token)
        if seq.matcher is not None:
            seq.matcher.advance(token)
        if p.logprobs is not None:
            seq.logprobs.append(logprobs_of(logits, token, p.logprobs))
        prev_len = len(seq.text)
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.add(token)
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                self._finish(seq, "stop")
            elif token in p.stop_token_ids:
                self._finish(seq, "stop", token)
            elif p.stop:
                self._check_stop_strings(seq, prev_len)
        if not seq.finished and seq.matcher is not None and seq.matcher.done:
            self._finish(seq, "stop")  # the grammar is complete (also under ignore_eos)
        if not seq.finished and (n_out >= p.max_tokens or len(seq) >= self.max_model_len):
            self._finish(seq, "length")

    def _check_stop_strings(self, seq: Sequence, prev_len: int) -> None:
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, prev_len - longest + 1)
        hits = [(i, s) for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            seq.text = seq.text[: i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
            self._finish(seq, "stop", s)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        """The delta since the last output. While a stop string could still be forming at the
        end of the text, that tail is held back."""
        end = len(seq.text)
        if not seq.finished and seq.params.stop:
            end = max(seq.sent_text_len, end - (max(len(s) for s in seq.params.stop) - 1))
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=seq.output_token_ids[seq.sent_tokens :],
            new_text=seq.text[seq.sent_text_len : end],
            new_logprobs=seq.logprobs[seq.sent_tokens :],
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            text=seq.text[:end],
            queue_time=(seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time
            if seq.sent_tokens == 0
            else None,
        )
        seq.sent_tokens, seq.sent_text_len = seq.num_output_tokens, end
        return out

    # ---- convenience for scripts and tests ----

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        arrival_steps: list[int] | None = None,
    ) -> list[Sequence]:
        """Run prompts to completion; prompt i joins the running batch at step arrival_steps[i]."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        arrivals = arrival_steps or [0] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        seqs: dict[str, Sequence] = {}
        step = 0
        while step <= max(arrivals) or self.has_unfinished():
            for i, a in enumerate(arrivals):
                if a == step:
                    self.add_request(ids[i], prompts[i], plist[i])
                    seqs[ids[i]] = self.seqs[ids[i]]
            self.step()
            step += 1
        return [seqs[i] for i in ids]


__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams", "Status"]
