"""The OpenAI API's request and response bodies (pydantic), as raymix accepts and answers them.

Request field names, defaults and ranges are OpenAI's, plus the sampling extras vLLM accepts
(top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, ...); validation
errors become OpenAI-shaped 400s naming the parameter. The response models are what the
endpoints send (`body()`), so the OpenAPI document describes both directions as they are.
Fields OpenAI leaves out when they do not apply (a delta's role, usage without prices) are
left out here too (`OMIT`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moe.errors import RequestError
from moe.sampling import SamplingParams


def OMIT(default: Any = None) -> Any:
    """A response field left out of the body while it is None."""
    return Field(default=default, exclude_if=lambda v: v is None)


class OpenAIBody(BaseModel):
    def body(self) -> dict[str, Any]:
        return self.model_dump()


# ---- errors ----


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBody):
    error: ErrorInfo


def error_body(
    message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).body()


def validation_param(errors: Sequence[Any]) -> tuple[str, str]:
    """The first of pydantic's (or FastAPI's body) validation errors → (parameter path, message)."""
    err = errors[0]
    parts = list(err["loc"])
    if parts and parts[0] == "body":  # FastAPI's prefix for the request body
        parts = parts[1:]
    loc = ".".join(str(p) for p in parts if not str(p).startswith("function-after"))
    return loc or "body", f"{loc}: {err['msg']}" if loc else err["msg"]


# ---- requests ----


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type in TEXT_PARTS)
        return self.content or ""

    def to_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        d: dict[str, Any] = {"role": role, "content": self.text()}
        for k in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        reasoning = (self.model_extra or {}).get("reasoning_content")
        if isinstance(reasoning, str):  # an earlier answer's reasoning, for templates that keep it
            d["reasoning_content"] = reasoning
        return d


TEXT_PARTS = ("text", "input_text", "output_text")  # chat's, and the Responses API's


def template_messages(messages: list[ChatMessage], field: str = "messages") -> list[dict[str, Any]]:
    """The messages as the chat template takes them, their text parts joined. A part this
    text-only model cannot read (image_url, input_audio, file, ...) is refused, naming it,
    rather than dropped: an answer about a picture the model never saw would be worse."""
    for i, m in enumerate(messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type not in TEXT_PARTS:
                raise RequestError(
                    f"content parts of type {part.type!r} are not supported: this model reads text only",
                    param=f"{field}.{i}.content.{j}",
                )
    return [m.to_template() for m in messages]


class SamplingFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    user: str | None = None

    @model_validator(mode="after")
    def _stop_list(self) -> SamplingFields:
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("at most 16 stop sequences")
        return self

    def include_usage(self) -> bool:
        """stream_options.include_usage: a last chunk with usage (and "usage": null before it)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        choice: int,
        defaults: dict[str, Any] | None = None,
        grammar: str | None = None,
        extra_bias: dict[int, float] | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The engine's parameters for choice `choice`; what the request leaves out comes from
        `defaults` (moe.engine.generation), then OpenAI's defaults."""
        d = defaults or {}

        def pick(name: str, openai_default: Any) -> Any:
            v = getattr(self, name)
            return v if v is not None else d.get(name, openai_default)

        bias: dict[int, float] = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                bias[int(k)] = v
            except ValueError:
                raise RequestError(
                    f"logit_bias keys must be token ids, got {k!r}", param="logit_bias"
                ) from None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            seed=None if self.seed is None else (self.seed + choice) % 2**63,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias=(bias | (extra_bias or {})) or None,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            grammar=grammar,
        )


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format; "json" is DeepInfra's spelling of json_object."""

    type: Literal["text", "json_object", "json_schema", "json"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required", "any"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # Mistral's API: random_seed is its seed; safe_prompt prepends its guardrail system prompt
    random_seed: int | None = Field(default=None, ge=0, lt=2**64)
    safe_prompt: bool = False
    # vLLM's: the chat template's own variables ({"enable_thinking": false}), whether the
    # assistant's turn is opened, or the last (assistant) message continued instead
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=32)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _mistral_names(self) -> ChatCompletionRequest:
        if self.seed is None and self.random_seed is not None:
            self.seed = self.random_seed
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class PredictRequest(SamplingFields):
    """Baseten's REST body (`/production/predict`): messages, stream, max_new_tokens, temperature."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    max_new_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=0)  # 0 with echo and logprobs: score the prompt only
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


# ---- responses ----


class UsageInfo(OpenAIBody):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_cost: float | None = OMIT()  # DeepInfra's, when prices are configured


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = OMIT()  # the model's <think> text (vLLM's reasoning parsers)
    tool_calls: list[ToolCall] | None = OMIT()


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(OpenAIBody):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class FunctionDelta(BaseModel):
    name: str | None = OMIT()
    arguments: str


class ToolCallDelta(BaseModel):
    """A streamed tool call: first its id, type and name (arguments ""), then its arguments."""

    index: int
    id: str | None = OMIT()
    type: Literal["function"] | None = OMIT()
    function: FunctionDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = OMIT()
    content: str | None = OMIT()
    reasoning_content: str | None = OMIT()
    tool_calls: list[ToolCallDelta] | None = OMIT()


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class StreamChunk(OpenAIBody):
    """With stream_options.include_usage every chunk has "usage": null until the last, which
    carries it (and no choices); without, chunks have no "usage" at all."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: UsageInfo | None = None

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude={"usage"} if "usage" not in self.model_fields_set else None)


class ChatCompletionChunk(StreamChunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionLogprobs(BaseModel):
    """One entry per token; with echo the prompt's tokens come first, the very first with
    null logprobs (nothing predicts it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(OpenAIBody):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(StreamChunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raymix"
    root: str
    max_model_len: int | None
    revision: str | None = None  # the checkpoint's content hash (moe.checkpoint.reader.checkpoint_revision)
    quantization: str | None = None  # "fp8" when the weights are held as FP8; None: as stored


class ModelList(OpenAIBody):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(OpenAIBody):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(OpenAIBody):
    prompt: str


class PredictResponse(OpenAIBody):
    """Baseten's answer: the conversation as the model saw it, then the answer."""

    output: str


class VersionResponse(OpenAIBody):
    version: str
    model_revision: str | None = None  # the served checkpoint's content hash
    quantization: str | None = None  # "fp8" when the weights are held as FP8; None: as stored


class RebalanceResponse(OpenAIBody):
    """What a rebalance (EPLB) did: the plan's predicted balancedness (mean / max tokens per
    shard over the recent load) before and after, and the replicated experts with their shards."""

    changed: bool
    reason: str | None = OMIT()  # why nothing could be planned (no shards, no spare slots)
    before: float | None = OMIT()
    after: float | None = OMIT()
    balancedness: float | None = OMIT()  # when the current placement is already the plan
    replicas: dict[str, list[int]] = Field(default_factory=dict)  # expert -> its shards


# ---- the Responses API (POST /v1/responses), stateless: a request becomes a chat request ----


class ResponsesInputItem(BaseModel):
    """A message ({role, content}), a function call the model made, or a tool's output for it."""

    model_config = ConfigDict(extra="allow")
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None  # input_text / output_text parts
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ResponsesTool(BaseModel):
    """The Responses API's function tool: the function's fields at the top level."""

    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesToolChoice(BaseModel):
    type: Literal["function"]
    name: str


class ResponsesTextFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponsesText(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: ResponsesTextFormat | None = None


class ResponsesRequest(BaseModel):
    """OpenAI's Responses request. Nothing is stored: the answer says `store: false`, and
    `previous_response_id` (a stored conversation) is refused; the conversation comes whole in
    `input`, and is served as a chat request (`to_chat`)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[ResponsesInputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[ResponsesTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool = True
    text: ResponsesText | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def to_chat(self) -> ChatCompletionRequest:
        """The same conversation as a chat request: instructions as the system message, function
        calls as an assistant's tool_calls, their outputs as tool messages; function tools,
        tool_choice and text.format in chat's shape. Raises RequestError naming what it refuses."""
        if self.previous_response_id is not None:
            raise RequestError(
                "previous_response_id is not supported: no response is stored here; send the whole "
                "conversation in input",
                param="previous_response_id",
            )
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = (
            [ResponsesInputItem(role="user", content=self.input)]
            if isinstance(self.input, str)
            else self.input
        )
        for i, item in enumerate(items):
            if item.type == "reasoning":  # an earlier answer's reasoning, sent back: templates drop it
                continue
            if item.type == "function_call":
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"},
                }
                last = messages[-1] if messages else None
                if last is not None and last.get("tool_calls") and not last["content"]:
                    last["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif item.type == "function_call_output":
                messages.append({"role": "tool", "content": item.output or "", "tool_call_id": item.call_id})
            else:
                if item.role is None:
                    raise RequestError("a message needs a role", param=f"input.{i}.role")
                parts = item.content if isinstance(item.content, list) else []
                for j, part in enumerate(parts):
                    if part.type not in TEXT_PARTS:
                        raise RequestError(
                            f"content parts of type {part.type!r} are not supported: this model reads text only",
                            param=f"input.{i}.content.{j}",
                        )
                text = item.content if isinstance(item.content, str) else "".join(p.text or "" for p in parts)
                messages.append({"role": item.role, "content": text})
        tools = None
        for k, t in enumerate(self.tools or []):
            if t.type != "function" or not t.name:
                raise RequestError(
                    f"tools of type {t.type!r} are not supported (only function)", param=f"tools.{k}"
                )
        if self.tools:
            tools = [
                {
                    "type": "function",
                    "function": t.model_dump(
                        include={"name", "description", "parameters", "strict"}, exclude_none=True
                    ),
                }
                for t in self.tools
            ]
        choice: Any = self.tool_choice
        if isinstance(choice, ResponsesToolChoice):
            choice = {"type": "function", "function": {"name": choice.name}}
        fmt = self.text.format if self.text else None
        response_format = None
        if fmt is not None and fmt.type == "json_schema":
            schema = {
                "name": fmt.name,
                "description": fmt.description,
                "schema": fmt.schema_ or {},
                "strict": fmt.strict,
            }
            response_format = {"type": "json_schema", "json_schema": schema}
        elif fmt is not None and fmt.type == "json_object":
            response_format = {"type": "json_object"}
        try:
            return self._chat_request(messages, tools, choice, response_format)
        except ValidationError as e:  # what chat refuses (a tool's name, too many items): a 400
            param, message = validation_param(e.errors())
            param = "input" + param.removeprefix("messages") if param.startswith("messages") else param
            raise RequestError(message.replace("messages", "input", 1), param=param) from None

    def _chat_request(
        self, messages: list[dict[str, Any]], tools: Any, choice: Any, response_format: Any
    ) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate(
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": self.max_output_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "tools": tools,
                "tool_choice": choice,
                "parallel_tool_calls": self.parallel_tool_calls,
                "response_format": response_format,
                "stream": self.stream,
                "user": self.user,
            }
        )


class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ResponseReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ResponseReasoningItem(OpenAIBody):
    """The model's reasoning (its <think> text), before its message or calls: as vLLM gives it,
    the text in `content`, no summary."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[dict[str, str]] = Field(default_factory=list)
    content: list[ResponseReasoningText]
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ResponseMessageItem(OpenAIBody):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[ResponseOutputText]


class ResponseFunctionCallItem(OpenAIBody):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int) -> ResponseUsage:
        return cls(
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
        )


class ResponseObject(OpenAIBody):
    """A `response`: while it runs (`in_progress`, no output yet), then `completed`, or
    `incomplete` with the reason when max_output_tokens cut it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    model: str
    output: list[ResponseReasoningItem | ResponseMessageItem | ResponseFunctionCallItem] = Field(
        default_factory=list
    )
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    store: Literal[False] = False
    previous_response_id: None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    usage: ResponseUsage | None = None

    @classmethod
    def of(cls, req: ResponsesRequest, response_id: str, model: str, created_at: int) -> ResponseObject:
        """The response to `req` before any output: the request's settings echoed, as OpenAI does."""
        return cls(
            id=response_id,
            created_at=created_at,
            model=model,
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            tool_choice=req.tool_choice.model_dump()
            if isinstance(req.tool_choice, BaseModel)
            else req.tool_choice or "auto",
            parallel_tool_calls=req.parallel_tool_calls,
            text=req.text.model_dump(by_alias=True, exclude_none=True)
            if req.text
            else {"format": {"type": "text"}},
            metadata=req.metadata or {},
            user=req.user,
        )

    def finished(
        self,
        output: list[ResponseReasoningItem | ResponseMessageItem | ResponseFunctionCallItem],
        finish_reason: str | None,
        usage: ResponseUsage,
    ) -> ResponseObject:
        cut = finish_reason == "length"
        if cut:
            for item in output:
                item.status = "incomplete"
        return self.model_copy(
            update={
                "status": "incomplete" if cut else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
                "output": output,
                "usage": usage,
            }
        )
