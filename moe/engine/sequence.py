"""A request as the engine tracks it (its tokens, its KV progress, its output so far), and the
processing of each sampled token into its output: stop conditions, detokenizing, deltas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

import torch

from moe.guided import GrammarMatcher
from moe.sampling import Logprobs, SamplingParams, logprobs_of, logprobs_of_rows
from moe.tokenizer import IncrementalDetokenizer


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    matcher: GrammarMatcher | None = None  # guided decoding: the request's grammar state
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached: int = 0  # of the prompt, tokens found in the prefix cache at admission
    # sampled tokens not yet on the host (0 or 1): with async scheduling, the last step's sample
    # stays on the device as the next step's input and is processed one step behind
    pending: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    text: str = ""  # output text so far (stop string excluded)
    sent_text_len: int = 0  # how much of `text` has been handed out
    sent_tokens: int = 0
    sent_prompt: bool = False  # the first output (with the prompt logprobs) went out
    resumed: int = 0  # output tokens another engine produced and sent before this one took over
    logprobs: list[Logprobs] = field(default_factory=list)  # of the outputs after `resumed`
    # prompt token i's logprobs given tokens < i (None for the first), when asked (echo)
    prompt_logprobs: list[Logprobs | None] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed: its prompt must run through the
        model (no prefix-cache hit), and the runner hands this sequence its prompt's logits."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def add_prompt_logprobs(self, logits: torch.Tensor, first: int) -> None:
        """logits [n, V] of positions first .. first+n-1, each predicting the token after it:
        record the prompt tokens' logprobs not recorded yet."""
        assert self.prompt_logprobs is not None and self.params.prompt_logprobs is not None
        start = len(self.prompt_logprobs)  # the next prompt token to score
        stop = min(first + logits.shape[0] + 1, self.num_prompt_tokens)
        if start < first + 1 or stop <= start:
            return
        rows = logits[start - 1 - first : stop - 1 - first]  # [stop - start, V]
        targets = self.prompt_token_ids[start:stop]
        self.prompt_logprobs.extend(logprobs_of_rows(rows, targets, self.params.prompt_logprobs))

    @property
    def token_ids(self) -> list[int]:
        """The tokens known on the host (a pending sample is not among them)."""
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        """Tokens so far, a pending sample included (the next step computes its K/V)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.pending

    @property
    def num_known(self) -> int:
        """Tokens known on the host: len(token_ids), without building the list."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def known_tokens(self, start: int, stop: int) -> list[int]:
        """token_ids[start:stop], without building the whole list (a decode step's one token)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @cached_property
    def plain(self) -> bool:
        """Whether its next tokens can be sampled without its last one on the host: no grammar,
        no penalties, bias or min_tokens over its output, no logprobs (async scheduling). Fixed
        once the engine has set its grammar, when the engine first asks."""
        p = self.params
        return self.matcher is None and p.logprobs is None and p.min_tokens == 0 and not p.needs_processing(0)

    def stops_by_length(self, max_model_len: int) -> bool:
        """Whether its pending sample is its last by length (max_tokens or the context)."""
        return self.pending > 0 and (
            self.num_output_tokens + self.pending >= self.params.max_tokens or len(self) >= max_model_len
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def resume(self, tokens: list[int], text_len: int | None = None) -> None:
        """Continue a request another engine started and lost (its router died): its first
        output tokens, already sent to the client, are taken as if sampled here (detokenized,
        the grammar advanced past them) and never sent again; the next step prefills the prompt
        and them, and what it samples follows them. `text_len`: the characters of their text
        the client got (less than all of it where a stop string might have been forming: the
        rest is sent from here). Their prompt logprobs went out with the first output."""
        for t in tokens:
            self._take(t)
        self.resumed = self.sent_tokens = len(tokens)
        self.sent_text_len = len(self.text) if text_len is None else min(text_len, len(self.text))
        self.sent_prompt, self.prompt_logprobs = True, None

    # ---- output processing: after each sampled token ----

    def _take(self, token: int) -> None:
        """An output token into the sequence: its grammar advanced, its text detokenized."""
        self.output_token_ids.append(token)
        if self.matcher is not None:
            self.matcher.advance(token)
        if self.detokenizer is not None:
            self.text += self.detokenizer.add(token)

    def append_token(
        self, token: int, logits: torch.Tensor | None, eos_token_ids: list[int], max_model_len: int
    ) -> None:
        """Take the sampled token (logits [V]: its row, for logprobs; None where none are asked),
        detokenize it, and finish the sequence if it stopped: EOS, a stop token or string, a
        complete grammar, or length."""
        p = self.params
        if p.logprobs is not None:
            assert logits is not None
            self.logprobs.append(logprobs_of(logits, token, p.logprobs))
        prev_len = len(self.text)
        self._take(token)
        n_out = self.num_output_tokens
        if n_out >= p.min_tokens:
            if token in eos_token_ids and not p.ignore_eos:
                self.finish("stop")
            elif token in p.stop_token_ids:
                self.finish("stop", token)
            elif p.stop:
                self._check_stop_strings(prev_len)
        if not self.finished and self.matcher is not None and self.matcher.done:
            self.finish("stop")  # the grammar is complete (also under ignore_eos)
        if not self.finished and (n_out >= p.max_tokens or len(self) >= max_model_len):
            self.finish("length")
        if self.finished and self.detokenizer is not None and not isinstance(self.stop_reason, str):
            self.text += self.detokenizer.flush()  # not after a stop string: the text was cut there

    def _check_stop_strings(self, prev_len: int) -> None:
        longest = max(len(s) for s in self.params.stop)
        start = max(0, prev_len - longest + 1)
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
            self.finish("stop", s)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark it finished (the engine then frees its KV blocks)."""
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.status = Status.FINISHED

    def take_output(self) -> RequestOutput:
        """The delta since the last output. While a stop string could still be forming at the
        end of the text, that tail is held back."""
        end = len(self.text)
        if not self.finished and self.params.stop:
            end = max(self.sent_text_len, end - (max(len(s) for s in self.params.stop) - 1))
        out = RequestOutput(
            request_id=self.request_id,
            new_token_ids=self.output_token_ids[self.sent_tokens :],
            new_text=self.text[self.sent_text_len : end],
            new_logprobs=self.logprobs[self.sent_tokens - self.resumed :],
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            text=self.text[:end],
            prompt_logprobs=None if self.sent_prompt else self.prompt_logprobs,
            queue_time=(self.first_scheduled_time or self.arrival_time) - self.arrival_time
            if self.sent_tokens == 0
            else None,
        )
        self.sent_tokens, self.sent_text_len = self.num_output_tokens, end
        self.sent_prompt = True
        return out


@dataclass
class RequestOutput:
    """What one step produced for one request: the delta since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[Logprobs]
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_output_tokens: int
    text: str = ""  # the whole output text so far
    prompt_logprobs: list[Logprobs | None] | None = None  # first output only, when asked
    queue_time: float | None = None  # seconds from arrival to first scheduled (first output only)

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by a later one of the same request, as one delta."""
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            new_text=self.new_text + later.new_text,
            new_logprobs=self.new_logprobs + later.new_logprobs,
            finished=later.finished,
            finish_reason=later.finish_reason,
            stop_reason=later.stop_reason,
            num_prompt_tokens=later.num_prompt_tokens,
            num_output_tokens=later.num_output_tokens,
            text=later.text,
            prompt_logprobs=self.prompt_logprobs
            if self.prompt_logprobs is not None
            else later.prompt_logprobs,
            queue_time=self.queue_time if self.queue_time is not None else later.queue_time,
        )
