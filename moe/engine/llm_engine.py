"""The engine: continuous batching over the dense model and an injected expert backend.

`step()` is the whole loop body, as nano-vllm splits it: the scheduler picks the step's flat
batch, the model runner runs it (moe.engine.model_runner), the sampler picks a token per sequence
(moe.engine.sampler), and each sequence processes its token into an output (moe.engine.sequence).
Requests join (`add_request`) and leave (finish, `abort_request`) between steps; their KV
blocks go back to the pool when they leave. The engine is single-threaded: whoever drives it
(a test, the benchmark, the router deployment) calls these methods from one thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.checkpoint.reader import open_checkpoint, parse_dtype
from moe.config import ModelConfig
from moe.engine.allocator import keep_freed_memory
from moe.engine.decode_path import DecodePath
from moe.engine.generation import generation_eos_ids
from moe.engine.kv_cache import BlockManager, KVCache, kv_cache_budget
from moe.engine.model_runner import ModelRunner, Pending
from moe.engine.sampler import Sampler
from moe.engine.scheduler import Scheduler
from moe.engine.sequence import RequestOutput, Sequence, Status
from moe.errors import OverloadedError, RequestError
from moe.expert_parallel.backend import ExpertBackend, InProcessExperts
from moe.guided import GrammarMatcher, GrammarTokenizer
from moe.layers.cpu_gemm import kernel_for
from moe.models.transformer import DenseModel
from moe.sampling import SamplingParams, skip_draws
from moe.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # None: from the device (moe.engine.kv_cache.kv_cache_budget)
    gpu_memory_utilization: float = 0.9  # on a GPU: the fraction of it this process's use may reach
    num_kv_blocks: int | None = None  # overrides both
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on GPU
    quantization: str | None = None  # "fp8": quantize an unquantized checkpoint's linears at load
    # the CPU's GEMM (moe.layers.cpu_gemm): "onednn" over prepacked weights, "torch" (its default), or
    # "auto": the faster of the two on this CPU, measured once per process
    cpu_gemm: str = "auto"
    device: str = "auto"  # auto: cuda if available, else cpu
    tokenizer_mode: str = "auto"
    overlap: bool = False  # two micro-batches per step, so attention overlaps remote experts
    max_queued_requests: int = 1024  # waiting requests beyond the running batch; more are refused
    enable_prefix_caching: bool = True  # reuse the KV blocks of shared prompt prefixes
    # decode steps replayed from CUDA graphs (moe.engine.decode_path); None: on where the captured step
    # can run (bf16 on SM90/SM100, experts in this process, unsplit, no overlap). True on a CPU
    # runs the same padded static-buffer step without capture (what the tests compare).
    cuda_graphs: bool | None = None
    # attention of decode-only steps (in the graphs or not): "flex" reads each sequence's KV
    # pages in place (FlexAttention, compiled on CUDA: moe.layers.flex_decode), "sdpa" gathers each
    # context into a dense tensor first (the reference; prefill always); auto: flex on CUDA with
    # pages of a multiple of 16 tokens
    attention_backend: str = "auto"
    # a step's samples stay on the device as the next step's inputs, their outputs processed one
    # step behind (vLLM's async scheduling), while every request is plain (Sequence.plain)
    async_scheduling: bool = True


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def gpu_memory(device: torch.device) -> dict[str, int] | None:
    """On a GPU: the bytes this process's allocator holds there and the GPU's total (None on
    the CPU)."""
    if device.type != "cuda":
        return None
    _, total = torch.cuda.mem_get_info(device)
    return {"used": int(torch.cuda.memory_reserved(device)), "total": int(total)}


def pick_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype)
    return parse_dtype(cfg.torch_dtype) if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class EngineStats:
    """The engine's gauges and counters (vLLM's names), as of the end of its last step."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage_perc: float = 0.0  # 0-1
    num_used_kv_blocks: int = 0
    num_kv_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of those, found cached


class LLMEngine:
    def __init__(
        self,
        cfg: ModelConfig,
        model: DenseModel,
        experts: ExpertBackend,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
        model_dir: str | Path | None = None,
    ):
        keep_freed_memory()  # this process's malloc keeps the step's buffers (moe.engine.allocator)
        self.cfg = cfg
        self.model = model
        self.experts = experts
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.device = model.device
        bs = config.block_size
        max_len = config.max_model_len or cfg.max_position_embeddings
        per_block = KVCache.bytes_per_block(cfg, bs, model.dtype)
        num_blocks = config.num_kv_blocks or min(  # the device is measured only when it decides
            config.max_num_seqs * -(-max_len // bs),
            kv_cache_budget(
                cfg,
                self.device,
                model.dtype,
                config.kv_cache_memory_bytes,
                config.gpu_memory_utilization,
                config.max_num_batched_tokens,
                config.max_num_seqs,
            )
            // per_block,
        )
        self.max_model_len = min(max_len, num_blocks * bs)
        if self.max_model_len < max_len:
            needs = -(-max_len // bs) * per_block
            why = (
                f"the KV cache holds {num_blocks * bs} tokens ({num_blocks * per_block / 2**30:.2f} GiB) and one "
                f"sequence of {max_len} needs {needs / 2**30:.2f} GiB"
            )
            if config.max_model_len is not None:  # asked for: an error now, not a surprise later
                raise ValueError(
                    f"max_model_len {max_len} does not fit: {why}; raise --gpu-memory-utilization "
                    "(GPU) or --kv-cache-memory-mb, or lower --max-model-len"
                )
            log.warning(
                "max_model_len lowered from the model's %d to %d: %s", max_len, self.max_model_len, why
            )
        self.kv_cache = KVCache(cfg, num_blocks, bs, model.dtype, self.device)
        self.blocks = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len
        )
        self.decode = DecodePath.decide(
            model,
            experts,
            self.kv_cache,
            config.max_num_seqs,
            self.max_model_len,
            config.cuda_graphs,
            config.attention_backend,
            config.overlap,
        )
        self.runner = ModelRunner(
            cfg, model, experts, self.kv_cache, self.blocks, config.overlap, self.decode
        )
        if self.decode is not None:
            self.decode.warm_up()  # every batch bucket compiled and captured before serving
        self.seqs: dict[str, Sequence] = {}
        eos = list(cfg.eos_token_ids)
        for t in [*generation_eos_ids(model_dir), *([tokenizer.eos_token_id] if tokenizer else [])]:
            if t not in eos:
                eos.append(t)
        self.eos_token_ids = eos
        self.vocab_size = cfg.vocab_size
        self.sampler = Sampler(eos, cfg.vocab_size)
        self.model_dir = model_dir
        self._grammar_tokenizer: GrammarTokenizer | None = None
        self._grammar_lock = threading.Lock()
        self._pending: Pending | None = None  # the last step's samples, on the device
        self.failed: list[tuple[str, BaseException]] = []  # requests a step failed alone

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, config: EngineConfig | None = None, num_shards: int = 1
    ) -> LLMEngine:
        """All of a checkpoint in this process: the dense part plus every expert."""
        config = config or EngineConfig()
        cfg, quant, reader = open_checkpoint(model_dir, config.quantization)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, cfg, device)
        gemm = kernel_for(config.cpu_gemm, device, dtype)
        model = DenseModel.from_checkpoint(reader, cfg, dtype, device, quant, gemm)
        experts = InProcessExperts.from_checkpoint(reader, cfg, dtype, device, num_shards, quant, gemm)
        return cls(cfg, model, experts, config, load_tokenizer(model_dir, config.tokenizer_mode), model_dir)

    # ---- requests in and out ----

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        matcher: GrammarMatcher | None = None,
        resumed: list[int] | None = None,
        resumed_text_len: int | None = None,
    ) -> None:
        """matcher: the request's grammar already compiled (`compile_grammar`, on another thread:
        AsyncEngine does so); without it a grammar is compiled here. resumed: the output tokens
        another engine already produced and sent (its router died; `resumed_text_len`: the
        characters of their text sent): this one continues after them (Sequence.resume), a
        seeded generator moved past their draws. Not refused for a full queue: it was admitted."""
        if not resumed and len(self.scheduler.waiting) >= self.config.max_queued_requests:
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
        resumed = resumed or []
        if resumed and (
            len(resumed) >= params.max_tokens or any(not 0 <= t < self.vocab_size for t in resumed)
        ):
            raise RequestError(
                "a resumed request's output must be shorter than max_tokens, in the vocabulary"
            )
        params.validate(self.vocab_size)
        n = len(prompt_token_ids)
        if n + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the messages, {params.max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="prompt",  # the API names it as its request does (messages, prompt, input)
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
            seq.matcher = matcher or self.compile_grammar(params.grammar, params.max_tokens)
        if resumed:
            seq.resume(resumed, resumed_text_len)
            if gen is not None and not params.greedy:
                skip_draws(gen, len(resumed), self.device)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. False if it is not (any longer) here."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish("abort")
        return True

    def compile_grammar(self, grammar: str, max_tokens: int) -> GrammarMatcher:
        """A request's grammar as a matcher at its start (RequestError when it is invalid or
        cannot close within max_tokens). Safe on any thread: AsyncEngine runs it beside the
        engine's, so a costly grammar never delays a step."""
        return self.grammar_tokenizer().matcher(grammar, max_tokens)

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The vocabulary for guided decoding, built on the first request that needs it (once,
        whichever thread asks first)."""
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                if self.model_dir is None:
                    raise RequestError(
                        "guided decoding needs the engine's model directory", param="response_format"
                    )
                self._grammar_tokenizer = GrammarTokenizer(
                    self.model_dir, self.vocab_size, self.eos_token_ids[0]
                )
            return self._grammar_tokenizer

    def has_unfinished(self) -> bool:
        pending = self._pending  # samples of sequences not yet finished still to process
        return self.scheduler.has_unfinished() or (
            pending is not None and any(not s.finished for s in pending.seqs)
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            kv_cache_usage_perc=self.blocks.usage(),
            num_used_kv_blocks=self.blocks.num_used_blocks,
            num_kv_blocks=self.blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.blocks.prefix_cache_queries,
            prefix_cache_hits=self.blocks.prefix_cache_hits,
        )

    # ---- the loop ----

    def step(self) -> list[RequestOutput]:
        """One step of the batch → the outputs it produced. With async scheduling (the default,
        while every request is plain: moe.engine.sequence), a step's samples stay on the device
        as the next step's inputs, and their outputs (detokenizing, stop strings, finishing)
        are processed one step behind: after the next step's work is queued, so on a GPU they
        run while it computes. A sequence that stops is then computed once more, and that
        sample is dropped: no token past a stop reaches a client."""
        run_ahead = self.config.async_scheduling and all(s.plain for s in self.seqs.values())
        outputs = [] if run_ahead else self._process_pending()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return outputs + self._process_pending()
        logits, seqs = self.runner.execute(scheduled, self._pending)  # [S, V], the S sequences that sample
        if not run_ahead:
            return outputs + self._postprocess(seqs, self.sampler(logits, seqs), logits)
        ids = self.sampler.sample_ids(logits, seqs)  # [S], on the device
        for seq in seqs:
            seq.pending += 1
        outputs += self._process_pending()  # the last step's, while this one computes
        self._pending = Pending.launch(seqs, ids) if seqs else None
        return outputs

    def _process_pending(self) -> list[RequestOutput]:
        """The outputs of the step whose samples are still pending, now."""
        pending, self._pending = self._pending, None
        return self._postprocess(pending.seqs, pending.token_list(), None) if pending else []

    def _postprocess(
        self, seqs: list[Sequence], tokens: list[int], logits: torch.Tensor | None
    ) -> list[RequestOutput]:
        """Each sequence's sampled token into its output; logits [S, V] (None: none needed)."""
        outputs = []
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.pending:
                seq.pending -= 1
                if seq.finished:  # stopped (or aborted) since: its last sample is dropped
                    continue
            try:
                if seq.params.max_tokens == 0:  # the prompt's logprobs only: nothing to generate
                    seq.finish("length")
                else:
                    row_logits = logits[row] if logits is not None else None
                    seq.append_token(token, row_logits, self.eos_token_ids, self.max_model_len)
                    self.runner.name_full_blocks(seq)  # a block the sample completed, now known
                output = seq.take_output()
            except Exception as e:  # this request's own (its grammar, its detokenizing): it alone fails
                log.exception("request %s failed while processing its token", seq.request_id)
                seq.finish("abort")
                self.failed.append((seq.request_id, e))
            else:
                outputs.append(output)
            if seq.finished:
                self.scheduler.finish(seq)  # its KV blocks go back to the pool
                self.seqs.pop(seq.request_id, None)
        return outputs

    def take_failures(self) -> list[tuple[str, BaseException]]:
        """Requests that failed in the steps since the last call, with their errors (the
        others went on)."""
        failed, self.failed = self.failed, []
        return failed

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
