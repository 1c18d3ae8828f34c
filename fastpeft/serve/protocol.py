"""The OpenAI API subset ``fastpeft serve`` speaks, as pydantic models (they are also the app's OpenAPI schema), and
``APIError``, the one exception every refusal is raised as.

Requests are validated strictly, as OpenAI's own server does: an integer field refuses ``1.5``, ``"1"`` and ``true``;
a number field takes integers. Unknown fields are ignored, so clients that send OpenAI parameters this server does not
implement (``user``, ``presence_penalty``, ...) still work. A new request field is one annotated attribute here;
``GenerationSettings`` fields are the ones every generation endpoint shares. What a field's type cannot say (``n``
against the server's batch, ``best_of == n``, chat's ``top_logprobs`` needing ``logprobs``, token ids against the
vocabulary) is checked in ``app.py``, answered 400 naming the field too.

Log-probabilities (``logprobs.py`` writes them): a completion's ``logprobs: k`` gives each choice OpenAI's legacy
object ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; chat's ``logprobs: true`` with
``top_logprobs: k`` gives ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal"}``; ``k`` lies in
``0 .. MAX_LOGPROBS``.
"""

from typing import Annotated, Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from .engine import MAX_LOGPROBS

# OpenAI's error types by status; anything else >= 500 is a "server_error".
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(HTTPException):
    """A refusal answered in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``, ``code`` being
    the HTTP status. A starlette ``HTTPException``, so it passes unchanged through FastAPI's request parsing (the body
    limit raises it from inside the body read)."""

    def __init__(self, status, message, param=None, error_type=None):
        super().__init__(status, message)
        self.status, self.message, self.param = status, message, param
        self.error_type = error_type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                                         else "server_error")

    def body(self):
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status}}


def _omitted_when_none(value):
    return value is None


ONE_OF_ERROR = "fastpeft_one_of"  # the error type of _one_of's refusals


def _one_of(message):
    """A validator for a union field whose refusal is ``message`` (rather than one error per form it may take)."""

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(ONE_OF_ERROR, message) from None

    return WrapValidator(validate)


NonEmptyString = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[List[int], Field(min_length=1)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
# Integers torch.Generator.manual_seed accepts (OpenAI's seed is an int64 too).
Seed = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="a last chunk with the request's usage and no choices")


class GenerationSettings(_Strict):
    """What every generation request shares: the served model (adapter) and the sampling settings."""

    model: str = Field(description="the base model's served name (no adapter) or an adapter's name (GET /v1/models)")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="below 1e-5: greedy (default: the server's)")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, description="continuations per prompt, prefilled once (at most the server's "
                                                      "batch); choices are numbered prompt-major")
    seed: Optional[Seed] = Field(None, description="makes sampled output reproducible; continuation j samples from "
                                                   "seed + j")
    stop: Annotated[Union[NonEmptyString, Annotated[List[NonEmptyString], Field(max_length=4)], None],
                    _one_of("stop must be a non-empty string or a list of at most 4 of them")] = Field(
        None, description="up to 4 strings that end the completion (left out of its text)")
    stream: Optional[bool] = Field(False, description="server-sent events, one chunk per piece of text")
    stream_options: Optional[StreamOptions] = None
    top_k: Optional[int] = Field(None, ge=-1, description="vLLM's: sample among the k likeliest tokens (0, -1: all)")
    # Not below 0.01: the processor divides positive logits by it, and a penalty that underflows float32 makes them
    # infinite (sampling then fails).
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10, description="vLLM's: 1 is off")
    ignore_eos: Optional[bool] = Field(False, description="vLLM's: generate past end-of-sequence tokens")
    return_token_ids: Optional[bool] = Field(False, description="vLLM's: each choice also lists its token ids")


class CompletionRequest(GenerationSettings):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "fastpeft-tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}]})

    prompt: Annotated[Union[str, Annotated[List[str], Field(min_length=1)], TokenIds,
                            Annotated[List[TokenIds], Field(min_length=1)]],
                      _one_of("prompt must be a string, a list of strings, a non-empty list of token ids or a list of "
                              "them")] = Field(
        description="a string, a list of strings, a list of token ids, or a list of lists of token ids (one prompt "
                    "each; lm-evaluation-harness sends [[ids], ...])")
    max_tokens: Optional[int] = Field(None, ge=0, description="tokens to generate at most (default: the server's); "
                                                              "0 scores the prompt alone (with echo and logprobs)")
    logprobs: Optional[LogprobCount] = Field(None, description="each token's log-probability and the k likeliest "
                                                               "alternatives (OpenAI's legacy shape)")
    echo: Optional[bool] = Field(False, description="the prompt before the completion, in the text and the "
                                                    "log-probabilities (its first token's are null)")
    best_of: Optional[int] = Field(None, description="only as n: every continuation generated is returned")


class ChatMessage(_Strict):
    role: str
    content: str


class ChatCompletionRequest(GenerationSettings):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "fastpeft-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
         "stream": True}]})

    messages: Annotated[List[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[int] = Field(None, ge=1, description="tokens to generate at most (default: the server's)")
    logprobs: Optional[bool] = Field(False, description="each generated token's log-probability")
    top_logprobs: Optional[LogprobCount] = Field(None, description="the k likeliest alternatives per token (needs "
                                                                   "logprobs: true)")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name of max_tokens "
                                                                         "(preferred when both are given)")


class AddAdapterRequest(_Strict):
    name: NonEmptyString
    path: NonEmptyString = Field(description="a PEFT adapter directory on the server")


# ----- responses ---------------------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[Any] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[List[int]] = Field(None, exclude_if=_omitted_when_none)


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = Field(None, exclude_if=_omitted_when_none)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[Any] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[List[int]] = Field(None, exclude_if=_omitted_when_none)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = Field(None, exclude_if=_omitted_when_none)
    content: Optional[str] = Field(None, exclude_if=_omitted_when_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[Any] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[List[int]] = Field(None, exclude_if=_omitted_when_none)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = Field(None, exclude_if=_omitted_when_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastpeft"
    parent: Optional[str] = Field(None, exclude_if=_omitted_when_none, description="an adapter's base model")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[int] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
