"""A request as the engine tracks it: its tokens, its KV progress and its output so far."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from moe.guided import GrammarMatcher
from moe.sampling import Logprobs, SamplingParams
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
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    text: str = ""  # output text so far (stop string excluded)
    sent_text_len: int = 0  # how much of `text` has been handed out
    sent_tokens: int = 0
    logprobs: list[Logprobs] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


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
            queue_time=self.queue_time if self.queue_time is not None else later.queue_time,
        )
