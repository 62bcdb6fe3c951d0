"""The server's wire format (OpenAI's completions and chat completions, as far as gptkit serves
them), its limits, and its error envelope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError


@dataclass
class Limits:
    max_body_bytes: int = 64 * 1024
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    send_timeout_s: float = 30.0  # a client that reads nothing of its answer this long: dropped
    max_connections: int = 1024  # open connections; past it the longest idle one is closed
    shutdown_timeout_s: float = 30.0  # on SIGTERM, answers under way may finish this long
    max_prompt_chars: int = 16 * 1024
    max_tokens: int = 1024
    max_choices: int = 16  # prompts x n
    max_concurrent: int = 16  # requests decoding together in the running batch
    max_queued: int = 64
    template_timeout_s: float = 2.0  # rendering a chat template, in its worker process
    stream_interval_s: float = 0.01  # streamed text is handed over at most this often


def _integral(value: Any) -> Any:
    """A number with no fraction (``16.0``, as float arithmetic makes it) as the int it is;
    anything else as given (a bool stays a bool, and is refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]  # an int field of a request


# A seed: any 64-bit integer, as OpenAI's and vLLM's; a negative one is taken modulo 2**64 (the
# random generators take non-negative seeds; -1 and 2**64 - 1 are the same seed).
def _seed(value: int) -> int:
    if not -(2**63) <= value <= 2**64 - 1:  # pydantic's own bound prints 2**64 - 1 as a float
        raise ValueError(f"must be a 64-bit integer, from {-(2**63)} to {2**64 - 1}")
    return value % 2**64


Seed = Annotated[int, BeforeValidator(_integral), AfterValidator(_seed)]


def _prompt_shape(value: Any) -> Any:
    """A completions prompt of one of OpenAI's four shapes, or one clear error (pydantic's
    own names only the first shape it tried: ``[5, true]`` was "should be a valid string")."""
    if isinstance(value, str) or value == []:  # an empty list: refused later, by name
        return value
    if isinstance(value, list) and (
        all(isinstance(v, str) for v in value)
        or _token_ids(value)
        or all(_token_ids(v) for v in value)
    ):
        return value
    raise PydanticCustomError(
        "prompt_shape",
        "give a string, a list of strings, a list of token ids (integers) or a list of "
        "token-id lists",
    )


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


DEFAULT_MAX_TOKENS = 16  # OpenAI's, when a request gives none (or null)


class Strict(BaseModel):
    """A request part: a field gptkit does not know is a 400 naming it, never ignored; a value
    of the wrong JSON type too (``"stream": "yes"`` or a token id ``true`` is not taken as
    true or 1; an integer is a number, and ``16.0`` an integer)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class SharedFields(Strict):
    """Fields both endpoints take: the logit processing gptkit implements (penalties, bias),
    and OpenAI fields it does not, accepted by the schema only so that a request setting one
    (to anything but its neutral value) is refused with 400 naming it (``refused``)."""

    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted from a token's logit once it was generated."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted from a token's logit per time it was generated."
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id -> added to its logit (-100..100; -100 bans it)."
    )
    tools: list[Any] | None = Field(None, description="Not supported.")
    tool_choice: Any = Field(None, description="Not supported.")
    functions: list[Any] | None = Field(None, description="Not supported.")
    function_call: Any = Field(None, description="Not supported.")
    response_format: dict[str, Any] | None = Field(
        None, description='Only {"type": "text"} is supported.'
    )
    user: str | None = Field(None, description="Accepted as metadata; not used.")
    metadata: dict[str, str] | None = Field(None, description="Accepted; not used.")
    store: bool | None = Field(None, description="Nothing is stored: only false (or unset).")
    parallel_tool_calls: bool | None = Field(None, description="Not supported (tools are not).")
    top_k: Int | None = Field(
        None, ge=1, le=100_000, description="Sample from the k likeliest tokens (vLLM's field)."
    )

    @field_validator("n", "stream", "echo", mode="before", check_fields=False)
    @classmethod
    def _null_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """``null`` for a field with a default is that default, as OpenAI takes it."""
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    def refused(self) -> str | None:
        """The first field set that gptkit would have to ignore, or None."""
        neutral: dict[str, Any] = {
            "response_format": (None, {"type": "text"}),
            "suffix": (None, ""),
            "best_of": (None, 1),
            "store": (None, False),
        }
        unsupported = (
            *neutral,
            *("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"),
        )
        for name in unsupported:
            if getattr(self, name, None) not in neutral.get(name, (None,)):
                return name
        return None


class CompletionRequest(SharedFields):
    """The part of OpenAI's completions request that gptkit honours (other fields that would
    change the answer are refused with 400, never silently ignored)."""

    model: str | None = None
    prompt: Annotated[
        str | list[str] | list[int] | list[list[int]], BeforeValidator(_prompt_shape)
    ] = Field(
        ..., description="A prompt, a list of prompts, token ids, or a list of token-id lists."
    )
    max_tokens: Int | None = Field(
        DEFAULT_MAX_TOKENS, ge=0, description=f"{DEFAULT_MAX_TOKENS} when unset or null."
    )
    temperature: float | None = Field(None, ge=0, le=10, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: Int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Return the prompt before the completion.")
    logprobs: Int | None = Field(
        None, ge=0, le=5, description="Log-probabilities of the tokens and this many alternatives."
    )
    best_of: Int | None = Field(None, ge=1, description="Only 1 (or unset) is supported.")
    suffix: str | None = Field(None, description="Not supported.")


class ContentPart(BaseModel):
    """A part of a chat message's content: only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="allow")  # other part types are refused by name

    type: str
    text: str | None = None


class ChatMessage(Strict):
    """A message. The fields of an assistant message that OpenAI's client sends back as it
    received them (``message.model_dump()``) are taken at their neutral values; any other
    value is refused by name (``refused``)."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = Field(
        ..., description="Text, or text parts; null only in an assistant message."
    )
    name: str | None = Field(
        None, max_length=64, description="The author's name, given to the chat template."
    )
    refusal: str | None = Field(None, description="Not supported (null only).")
    annotations: list[Any] | None = Field(None, description="Not supported (null or []).")
    audio: Any = Field(None, description="Not supported (null only).")
    function_call: Any = Field(None, description="Not supported (null only).")
    tool_calls: list[Any] | None = Field(None, description="Not supported (null or []).")

    def refused(self) -> str | None:
        """The first field set to what gptkit would have to ignore, or None."""
        if self.content is None and self.role != "assistant":
            return "content"
        for name in ("refusal", "annotations", "audio", "function_call", "tool_calls"):
            if getattr(self, name) not in (None, []):
                return name
        return None


class ChatRequest(SharedFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Int | None = Field(None, ge=1)  # OpenAI's chat refuses 0 too
    max_completion_tokens: Int | None = Field(None, ge=1, description="max_tokens' new name.")
    temperature: float | None = Field(None, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: Int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(None, description="Log-probabilities of the tokens.")
    top_logprobs: Int | None = Field(
        None, ge=0, le=20, description="Alternatives per token (with logprobs: true)."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    text: str
    index: int
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """OpenAI's model object, with what a client needs to fit its requests to the model."""

    id: str
    object: Literal["model"] = "model"
    created: int  # when this server began serving it
    owned_by: str
    max_seq_len: int
    vocab_size: int
    precision: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Bad request: the message says why, `param` names the field"),
        (404, "Unknown model"),
        (408, "Request body not received in time"),
        (413, "Request body too large"),
        (429, "Busy: retry later"),
        (500, "Server error (the traceback is in the server's log)"),
    )
}
LOOKUP_ERRORS = {code: ERRORS[code] for code in (404, 500)}  # a GET: no body to refuse
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'The answer; with `"stream": true`, server-sent events: one '
        "`data: {chunk}` line per event, then `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


# The ASGI scope key a streamed answer sets when its client went away after the headers were
# sent: the access log then says 499 (the status line the client got said 200).
CLIENT_LEFT = "gptkit.client_left"


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )
