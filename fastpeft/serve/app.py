"""The HTTP API of ``fastpeft serve``: an ASGI app (FastAPI) speaking OpenAI's completions API over a generation
client (``EngineClient`` in-process, ``ray_serve``'s client in a Ray ingress).

Routes (the OpenAPI schema is at ``/openapi.json``, browsable at ``/docs``):
    GET    /v1/models               the base model and every adapter (``id`` = the name a request's ``model`` uses)
    POST   /v1/completions          ``protocol.CompletionRequest``; server-sent events with ``"stream": true``
    POST   /v1/chat/completions     ``protocol.ChatCompletionRequest`` (the tokenizer's chat template, else role lines)
    GET    /health                  ``{"status": "ok", "running", "waiting", ...}``; 503 while draining
    GET    /metrics                 Prometheus text (``metrics.py``)
    POST   /admin/adapters          ``{"name", "path"}``: load a PEFT adapter directory (bearer token)
    DELETE /admin/adapters/{name}   remove it (bearer token); its running requests end with 409

A request's ``model`` names its adapter; the base model's name means no adapter. ``temperature`` 0 (or below
``SAMPLING_EPS``) is greedy;
sampling, ``top_k`` and ``repetition_penalty`` go through transformers' logits processors in the engine. ``stop``
strings cut the text and end the request.

A completion's ``prompt`` is a string, a list of strings, a list of token ids or a list of lists of token ids (what
lm-evaluation-harness's ``local-completions`` sends); each prompt gets ``n`` choices (``best_of`` only as ``n``),
numbered prompt-major (prompt p's j-th is choice ``p * n + j``) as OpenAI does. The ``n`` continuations of a prompt
are submitted as one group (prefilled once); with a ``seed`` continuation j samples from ``seed + j``. ``logprobs:
k`` returns OpenAI's legacy log-probabilities per choice (``logprobs.py``), the end-of-sequence token that ended a
choice last (as vLLM); ``echo: true`` puts the prompt before the completion, its tokens' log-probabilities first
(None for the first token), and ``max_tokens: 0`` scores the prompt alone (an encoder-decoder base answers ``echo``
with 400: its prompt is the encoder's input, which no model scores). Chat takes ``logprobs: true`` and
``top_logprobs: k``. Log-probabilities are the adapter's model's, before any sampling transform (``engine.py``); a
stream sends each chunk's tokens' entries with it. ``usage`` counts every prompt once and every choice's tokens.
One reply multiplexes every choice's stream (one task each feeding one queue).

Errors use OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``: 400 bad request (pydantic's validation errors included), 401 bad token, 403 admin off, 404 unknown model
or route, 409 adapter removed mid-request, 413 body too large, 429 queue full, 500 internal error, 503 draining or
shutting down, 504 no token for ``EVENT_TIMEOUT_S``.

A client that goes away is heard on the ASGI receive channel (``http.disconnect``), streamed or not, queued or
running: its request is cancelled and its KV blocks freed at the next token boundary. ``DrainState`` is the graceful
stop: once draining, new requests get 503 while those in flight finish (``server.py`` drains on SIGTERM).
"""

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from ..version import __version__
from .logprobs import chat_logprobs, completion_logprobs
from .metrics import ServeMetrics
from .protocol import (ONE_OF_ERROR, AddAdapterRequest, AdapterDeleted, APIError, AssistantMessage, ChatChoice, ChatChunkChoice,
                       ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, Completion,
                       CompletionChoice, CompletionRequest, ErrorResponse, ModelCard, ModelList, Usage)

MAX_BODY_BYTES = 1 << 20
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}
# A refused body (413, or 503 while draining) is read and dropped up to this size before the answer; past it the
# connection is closed unread (the client sees a reset).
REFUSED_BODY_READ_LIMIT = 64 << 20
SAMPLING_EPS = 1e-5  # a temperature below this is greedy decoding
CLIENT_CLOSED = 499  # the status a request whose client went away is counted under in /metrics (nginx's)


@dataclass
class ServeConfig:
    """What the routes need besides the generation client: the tokenizer, the base model's served name, the admin
    token (None: admin routes off) and the limits."""

    tokenizer: object
    base_name: str
    admin_token: str = None
    max_tokens_limit: int = 256
    default_max_tokens: int = 16
    default_temperature: float = 1.0
    max_body_bytes: int = MAX_BODY_BYTES
    max_choices: int = 16           # n at most: the continuations of one prompt run together (the engine's max_batch)
    max_request_choices: int = 80   # prompts x n at most: what the engine holds at once (max_batch + max_queue)
    scores_prompt: bool = True      # False for an encoder-decoder, whose decoder does not score the prompt: no echo


class DrainState:
    """Requests in flight, and whether new ones are refused (503): ``begin()`` starts the drain, ``idle`` tells when
    the last request in flight has finished. Read and changed on the event loop only."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0

    def begin(self):
        self.draining = True

    @property
    def idle(self):
        return self.in_flight == 0


# ----- plumbing ----------------------------------------------------------------------------------------------------

def _error_response(error):
    return JSONResponse(error.body(), status_code=error.status)


async def _send_error(send, error):
    """``error`` as a whole ASGI response (for the gate, which answers before any route runs)."""
    response = _error_response(error)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


async def _discard_body(receive, limit=REFUSED_BODY_READ_LIMIT):
    """Read and drop the rest of a refused request's body (at most ``limit`` bytes). A client that sends its whole
    body before reading the answer (Python's urllib, which also asks to close the connection) must find the body
    read: a server that closes with unread bytes resets the connection, and the client sees a broken pipe instead of
    the 413 or 503."""
    read = 0
    while read <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class _RequestGate:
    """Pure ASGI middleware in front of every route: refuses new requests while draining (503; ``/metrics`` still
    answers), refuses bodies over ``max_body_bytes`` (413: before any route runs when ``Content-Length`` says so;
    for a chunked body once its bytes pass the limit), counts requests in flight for the drain, and counts
    generation requests by adapter and status for /metrics. A refused body is read and dropped before the answer
    (``_discard_body``), unless the client waits for ``100 Continue`` and so sends no body at all."""

    def __init__(self, app, drain, metrics, max_body_bytes):
        self.app, self.drain, self.metrics, self.max_body_bytes = app, drain, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        waits_for_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        declared = headers.get(b"content-length", b"0")
        refusal = (APIError(503, "the server is shutting down; retry on another replica")
                   if self.drain.draining and scope["path"] != "/metrics" else
                   self._too_large() if declared.isdigit() and int(declared) > self.max_body_bytes else None)
        if refusal is not None:
            if not waits_for_continue:
                await _discard_body(receive)
            await _send_error(send, refusal)
            if scope["path"] in GENERATION_PATHS:
                self.metrics.requests.labels("", str(refusal.status)).inc()
            return
        received, status = 0, None

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    if message.get("more_body", False):
                        await _discard_body(receive)
                    raise self._too_large()
            return message

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        state = scope.setdefault("state", {})  # the routes record the request's adapter there (request.state)
        self.drain.in_flight += 1
        try:
            await self.app(scope, limited_receive, observed_send)
        finally:
            self.drain.in_flight -= 1
            if scope["path"] in GENERATION_PATHS and status is not None:
                self.metrics.requests.labels(state.get("adapter", ""), str(status)).inc()

    def _too_large(self):
        return APIError(413, f"the request body exceeds {self.max_body_bytes} bytes")


class _JSONBodyRoute(APIRoute):
    """Reads every request body as JSON whatever its Content-Type says: ``curl -d`` labels JSON
    ``application/x-www-form-urlencoded``, and no route here takes anything but JSON."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def as_json(request):
            headers = request.scope["headers"]
            content_type = dict(headers).get(b"content-type")
            if content_type is not None and not content_type.split(b";")[0].strip().endswith(b"json"):
                request.scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + [
                    (b"content-type", b"application/json")]
            return await handler(request)

        return as_json


def _validation_error(exc):
    """Pydantic's 422 as OpenAI's 400: ``param`` is the top-level field at fault."""
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'syntax')})")
    if not location:
        return APIError(400, "the request body must be a JSON object")
    message = first.get("msg", "invalid")
    if first.get("type") != ONE_OF_ERROR:  # protocol.py's own messages name their field already
        message = f"{'.'.join(location)}: {message}"
    return APIError(400, message, param=location[0])


def _stop_strings(stop):
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def _cut_at_stop(text, stops):
    """(text before the first stop string, True) when one occurs, else (text, False)."""
    positions = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return (text[:min(positions)], True) if positions else (text, False)


def _held_back(text, stops):
    """How many trailing characters of ``text`` could begin a stop string (not sent while streaming)."""
    return max([k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])], default=0)


async def _cancel_on_disconnect(receive, cancel):
    """Wait on the ASGI receive channel (the body is read by now: the next message is ``http.disconnect``, sent when
    the client goes away) and call ``cancel`` then."""
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel()


def _sse(data):
    """One server-sent event carrying ``data`` (a response model, or JSON text)."""
    return f"data: {data if isinstance(data, str) else data.model_dump_json()}\n\n"


# ----- the OpenAI routes' logic ------------------------------------------------------------------------------------

class OpenAIServing:
    """Maps OpenAI requests onto the generation client: resolves the adapter, tokenizes, submits every prompt's
    continuations, and turns their tokens into a whole response or server-sent events."""

    def __init__(self, config, client, metrics):
        self.config, self.client, self.metrics = config, client, metrics
        self.created = int(time.time())

    def models(self):
        base = self.config.base_name
        return ModelList(data=[ModelCard(id=base, created=self.created)] + [
            ModelCard(id=name, created=self.created, parent=base) for name in self.client.adapter_names()])

    def _adapter(self, model):
        """The adapter ``model`` names (None: the base model); 404 listing the served names otherwise."""
        if model == self.config.base_name:
            return None
        adapters = self.client.adapter_names()
        if model not in adapters:
            raise APIError(404, f"the model {model!r} does not exist; available: {[self.config.base_name] + adapters}",
                           param="model")
        return model

    def _prompts(self, prompt):
        """``[(token ids, the prompt's text or None)]``: one prompt per string, per list of token ids (a flat list of
        ids is one prompt)."""
        tokenizer = self.config.tokenizer
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], str):
            prompts = [(tokenizer(text)["input_ids"], text) for text in prompt]
            if not all(ids for ids, _ in prompts):
                raise APIError(400, "a prompt holds no token", param="prompt")
            return prompts
        if isinstance(prompt[0], int):
            prompt = [prompt]
        vocab = len(tokenizer)
        if not all(0 <= token < vocab for ids in prompt for token in ids):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return [(list(ids), None) for ids in prompt]

    def _chat_ids(self, messages):
        tokenizer = self.config.tokenizer
        messages = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        # No chat template (the built-in model): one "role: content" line per message, then "assistant:".
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenizer(text)["input_ids"]

    @staticmethod
    def _top_logprobs(body, chat):
        """How many alternatives per token the request asks for (None: no log-probabilities). Completions:
        ``logprobs: k``; chat: ``logprobs: true`` with ``top_logprobs: k`` (default 0)."""
        if not chat:
            return body.logprobs
        if not body.logprobs:
            if body.top_logprobs is not None:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return 0 if body.top_logprobs is None else body.top_logprobs

    def _plan(self, body, chat, adapter):
        """``(prompts, fields, n, top_logprobs)`` for ``body``: the prompts as ``[(token ids, echo text or None)]``,
        the engine request's fields every prompt shares (``GenerationRequest``'s keyword arguments but
        ``prompt_ids``), the continuations per prompt and the log-probability count (None: not asked)."""
        config = self.config
        param, max_tokens = "max_tokens", body.max_tokens
        if chat and body.max_completion_tokens is not None:
            param, max_tokens = "max_completion_tokens", body.max_completion_tokens
        max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > config.max_tokens_limit:
            raise APIError(400, f"{param}={max_tokens} exceeds this server's limit of {config.max_tokens_limit}",
                           param=param)
        temperature = config.default_temperature if body.temperature is None else body.temperature
        if temperature < SAMPLING_EPS:  # greedy, as vLLM: dividing logits by a tinier one overflows float32
            temperature = 0.0
        n = 1 if body.n is None else body.n
        if n > config.max_choices:
            raise APIError(400, f"n must be at most {config.max_choices} (this server's batch), got {n}", param="n")
        if not chat and body.best_of is not None and body.best_of != n:
            raise APIError(400, f"best_of must equal n ({n}) here: the server returns every continuation it "
                                f"generates", param="best_of")
        top_logprobs = self._top_logprobs(body, chat)
        echo = not chat and body.echo
        if echo and not config.scores_prompt:
            raise APIError(400, "echo is not available for this encoder-decoder model: its prompt is the encoder's "
                                "input, which the decoder does not score (there are no prompt log-probabilities to "
                                "echo)", param="echo")
        if chat:
            prompts = [(self._chat_ids(body.messages), None)]
        else:
            prompts = [(ids, (self.decode(ids) if text is None else text) if echo else None)
                       for ids, text in self._prompts(body.prompt)]
        if len(prompts) * n > config.max_request_choices:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} continuations exceed the "
                                f"{config.max_request_choices} requests this server holds at once", param="n")
        fields = {"adapter": adapter, "max_tokens": max_tokens, "temperature": float(temperature),
                  "top_p": 1.0 if body.top_p is None else body.top_p, "seed": body.seed,
                  "top_k": 0 if body.top_k in (None, -1) else body.top_k,
                  "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
                  "ignore_eos": bool(body.ignore_eos), "logprobs": top_logprobs,
                  "prompt_logprobs": top_logprobs if echo else None}
        return prompts, fields, n, top_logprobs

    async def generate(self, body, request, chat):
        adapter = self._adapter(body.model)
        request.state.adapter = body.model
        prompts, fields, n, top_logprobs = self._plan(body, chat, adapter)
        # Choices are numbered prompt-major (prompt p's continuation j is choice p * n + j), as OpenAI numbers them.
        choices = []
        try:
            for ids, echo_text in prompts:
                streams = await self.client.open({**fields, "prompt_ids": ids}, n)
                choices += [_Choice(len(choices) + j, stream, ids, echo_text) for j, stream in enumerate(streams)]
        except BaseException:  # a later prompt refused (or the client went away): end the ones already queued
            for choice in choices:
                choice.stream.cancel()
            raise
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        self.metrics.prompt_tokens.labels(body.model).inc(prompt_tokens)
        reply = _Reply(self, body, chat, choices, prompt_tokens, top_logprobs)
        if body.stream:
            return StreamingResponse(reply.events(request.receive), headers={**SSE_HEADERS, **reply.headers})
        return await reply.whole(request.receive)

    def decode(self, ids):
        return self.config.tokenizer.decode(ids, skip_special_tokens=True)


class _Choice:
    """One choice of a reply, built from its ``GenerationStream`` 's events: the generated ids, their
    log-probabilities (when asked), the prompt's (echo) and the text, stop strings applied; while streaming, what of
    it was sent."""

    def __init__(self, index, stream, prompt_ids, echo_text):
        self.index, self.stream, self.prompt_ids, self.echo_text = index, stream, prompt_ids, echo_text
        self.ids, self.logprobs, self.prompt_logprobs, self.end_logprob = [], [], None, None
        self.text, self.finish_reason = "", None
        self.last_event_at = stream.submitted_at  # for time to first token and inter-token latency
        self._next_logprob = None  # the engine sends a token's log-probabilities just before the token
        # Streaming: the text sent, the generated tokens sent, the tokens whose log-probabilities were sent (an
        # echoed prompt's included) and the legacy text_offset reached.
        self.sent_text, self.sent_ids, self.sent_logprobs, self.sent_offset = "", 0, 0, 0

    def feed(self, kind, value, decode, stops):
        """Take one event (``("done", reason)`` once the stream ended); True when the text or the end changed. A stop
        string ends the choice (cancelled in the engine) with the text cut before it and finish_reason ``"stop"``."""
        if kind == "prompt_logprobs":
            self.prompt_logprobs = value
            return False
        if kind == "logprobs":
            self._next_logprob = value
            return False
        if kind == "done":
            # A pending entry is the end-of-sequence token's that ended the request: not in the text, but in the
            # completion's log-probabilities (as vLLM reports it; lm-evaluation-harness drops the last entry).
            self.end_logprob, self._next_logprob = self._next_logprob, None
            self.finish_reason = value
            return True
        self.ids.append(value)
        self.logprobs.append(self._next_logprob)
        self._next_logprob = None
        self.text = decode(self.ids)
        if stops:
            self.text, stopped = _cut_at_stop(self.text, stops)
            if stopped:
                self.stream.cancel()
                self.finish_reason = "stop"
        return True

    @property
    def full_text(self):
        """The choice's text: the echoed prompt (``echo``), then the completion."""
        return self.text if self.echo_text is None else self.echo_text + self.text

    def logprob_tokens(self):
        """``(token ids, TokenLogprob or None per token)`` of a completion's log-probabilities: the echoed prompt's
        tokens, the generated ones, then the end-of-sequence token that ended it."""
        ids, entries = list(self.ids), list(self.logprobs)
        if self.echo_text is not None:
            ids, entries = self.prompt_ids + ids, self.prompt_logprobs + entries
        if self.end_logprob is not None:
            ids, entries = ids + [self.end_logprob.token], entries + [self.end_logprob]
        return ids, entries


class _Reply:
    """One request's answer, whole or streamed, from its choices' ``GenerationStream`` s."""

    def __init__(self, serving, body, chat, choices, prompt_tokens, top_logprobs):
        self.serving, self.body, self.chat, self.choices = serving, body, chat, choices
        self.prompt_tokens, self.top_logprobs, self.stops = prompt_tokens, top_logprobs, _stop_strings(body.stop)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.client_gone = False
        # which replica generates (Ray), for operators tracing a reply
        served_by = choices[0].stream.served_by
        self.headers = {"x-fastpeft-replica": served_by} if served_by else {}

    def _client_went_away(self):
        self.client_gone = True
        for choice in self.choices:
            choice.stream.cancel()

    async def updates(self):
        """Feed the choices their streams' events and yield each choice whose text or end changed, until every
        choice ended; raises the first error of any stream (``_finish`` then cancels the others). Records time to
        first token and inter-token latency per choice."""
        metrics, decode = self.serving.metrics, self.serving.decode
        events = asyncio.Queue()

        async def pump(choice):  # one task per choice puts its stream's events on the reply's one queue
            try:
                async for kind, value in choice.stream:
                    events.put_nowait((choice, kind, value))
                events.put_nowait((choice, "done", choice.stream.finish_reason))
            except Exception as error:  # APIError from the engine, or a bug: raised on the reply's side
                events.put_nowait((choice, "error", error))

        pumps = [asyncio.create_task(pump(choice)) for choice in self.choices]
        try:
            while any(choice.finish_reason is None for choice in self.choices):
                choice, kind, value = await events.get()
                if kind == "error":
                    raise value
                if choice.finish_reason is not None:  # ended by a stop string: its stream's end is no news
                    continue
                if kind == "token":
                    now = time.monotonic()
                    (metrics.inter_token_latency if choice.ids else metrics.time_to_first_token).observe(
                        now - choice.last_event_at)
                    choice.last_event_at = now
                if choice.feed(kind, value, decode, self.stops):
                    yield choice
        finally:
            for task in pumps:
                task.cancel()

    def _usage(self):
        generated = sum(len(choice.ids) for choice in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=generated,
                     total_tokens=self.prompt_tokens + generated)

    def _finish(self):
        for choice in self.choices:
            if choice.stream.finish_reason is None:
                choice.stream.cancel()
        self.serving.metrics.completion_tokens.labels(self.body.model).inc(sum(len(c.ids) for c in self.choices))

    def _logprobs(self, choice):
        """The whole ``logprobs`` object of a finished choice (None when not asked)."""
        if self.top_logprobs is None:
            return None
        tokenizer = self.serving.config.tokenizer
        if self.chat:
            return chat_logprobs(tokenizer, choice.ids, choice.logprobs)
        return completion_logprobs(tokenizer, *choice.logprob_tokens())[0]

    async def whole(self, receive):
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self._client_went_away))
        try:
            async for _ in self.updates():
                pass
        finally:
            watcher.cancel()
            self._finish()
        if self.client_gone:  # nobody reads this
            return Response(status_code=CLIENT_CLOSED)
        entries = []
        for choice in self.choices:
            token_ids = list(choice.ids) if self.body.return_token_ids else None
            if self.chat:
                entries.append(ChatChoice(index=choice.index, message=AssistantMessage(content=choice.text),
                                          logprobs=self._logprobs(choice), finish_reason=choice.finish_reason,
                                          token_ids=token_ids))
            else:
                entries.append(CompletionChoice(index=choice.index, text=choice.full_text,
                                                logprobs=self._logprobs(choice), finish_reason=choice.finish_reason,
                                                token_ids=token_ids))
        reply = (ChatCompletion if self.chat else Completion)(id=self.id, created=self.created,
                                                               model=self.body.model, choices=entries,
                                                               usage=self._usage())
        return Response(reply.model_dump_json(), media_type="application/json", headers=self.headers)

    def _chunk(self, choice, text, reason=None, first=False):
        """A chunk of ``choice``: ``text`` and what it generated since its last chunk (token ids, log-probabilities);
        ``first``: chat's opening chunk with the role."""
        tokenizer = self.serving.config.tokenizer
        token_ids = choice.ids[choice.sent_ids:] if self.body.return_token_ids and not first else None
        if self.chat:
            delta = ChatDelta(role="assistant", content=text) if first else ChatDelta(content=text or None)
            logprobs = None
            if self.top_logprobs is not None and not first:
                logprobs = chat_logprobs(tokenizer, choice.ids[choice.sent_ids:], choice.logprobs[choice.sent_ids:])
            chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.body.model, choices=[
                ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs, finish_reason=reason,
                                token_ids=token_ids)])
        else:
            logprobs = None
            if self.top_logprobs is not None:
                tokens, entries = choice.logprob_tokens()
                logprobs, choice.sent_offset = completion_logprobs(
                    tokenizer, tokens[choice.sent_logprobs:], entries[choice.sent_logprobs:], choice.sent_offset)
                choice.sent_logprobs = len(tokens)
            chunk = Completion(id=self.id, created=self.created, model=self.body.model, choices=[
                CompletionChoice(index=choice.index, text=text, logprobs=logprobs, finish_reason=reason,
                                 token_ids=token_ids)])
        if not first:
            choice.sent_ids = len(choice.ids)
        return chunk

    async def events(self, receive):
        """The server-sent events: per choice, a chunk per piece of text that can no longer change (with its tokens'
        log-probabilities when asked), the last with its finish_reason; then the usage chunk when asked, then
        ``[DONE]``. An engine error after the first byte is sent as an ``{"error": ...}`` event before ``[DONE]``."""
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self._client_went_away))
        try:
            if self.chat:
                for choice in self.choices:
                    yield _sse(self._chunk(choice, "", first=True))
            try:
                async for choice in self.updates():
                    if self.client_gone:
                        return
                    text, sent = choice.full_text, choice.sent_text
                    if choice.finish_reason is not None:
                        yield _sse(self._chunk(choice, text[len(sent):] if text.startswith(sent) else "",
                                               reason=choice.finish_reason))
                        continue
                    # Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until its next bytes arrive, and
                    # text that may begin a stop string.
                    stable = text.rstrip("\ufffd")
                    stable = stable[:len(stable) - _held_back(stable, self.stops)]
                    if stable.startswith(sent) and len(stable) > len(sent):
                        yield _sse(self._chunk(choice, stable[len(sent):]))
                        choice.sent_text = stable
            except APIError as error:
                yield _sse(json.dumps(error.body()))
            if self.client_gone:
                return
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                usage_chunk = (ChatCompletionChunk if self.chat else Completion)(
                    id=self.id, created=self.created, model=self.body.model, choices=[], usage=self._usage())
                yield _sse(usage_chunk)
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self._finish()


# ----- the app -----------------------------------------------------------------------------------------------------

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 409, 413, 429, 500, 503, 504)}
_SSE_CONTENT = {"text/event-stream": {"schema": {"type": "string", "description": "data: {chunk} events, then "
                                                                               "data: [DONE]"}}}


def create_app(config, client):
    """The FastAPI app serving ``client`` (``EngineClient`` or Ray's) under ``config`` (``ServeConfig``).
    ``app.state.drain`` is its ``DrainState``; ``app.state.serving`` its ``OpenAIServing``."""
    app = FastAPI(title="fastpeft serve", version=__version__, description="OpenAI-compatible completions for many "
                  "soft-prompt adapters of one base model, continuously batched.")
    app.router.route_class = _JSONBodyRoute
    metrics = ServeMetrics(gauges=client.gauges)
    serving = OpenAIServing(config, client, metrics)
    app.state.drain, app.state.serving, app.state.metrics = DrainState(), serving, metrics
    app.add_middleware(_RequestGate, drain=app.state.drain, metrics=metrics, max_body_bytes=config.max_body_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        if isinstance(exc, APIError):
            return _error_response(exc)
        # starlette's own: 404 no route, 405 wrong method
        return _error_response(APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error_response(_validation_error(exc))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # a bug: answer 500 in OpenAI's shape rather than drop the connection
        return _error_response(APIError(500, f"{type(exc).__name__}: {exc}"))

    bearer = HTTPBearer(auto_error=False, description="the server's --admin-token")

    def admin(credentials: HTTPAuthorizationCredentials = Depends(bearer)):
        if not config.admin_token:
            raise APIError(403, "the admin endpoints are off (start the server with --admin-token or "
                                "FASTPEFT_ADMIN_TOKEN)")
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), config.admin_token.encode()):
            raise APIError(401, "missing or wrong bearer token")

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return serving.models()

    @app.post("/v1/completions", response_model=Completion, responses={200: {"content": _SSE_CONTENT}, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        return await serving.generate(body, request, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": _SSE_CONTENT}, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.generate(body, request, chat=True)

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        return {"status": "ok", **client.health()}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {metrics.content_type: {}}}})
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    admin_errors = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404)}

    @app.post("/admin/adapters", status_code=201, response_model=ModelCard, responses=admin_errors,
              dependencies=[Depends(admin)])
    async def add_adapter(body: AddAdapterRequest):
        if body.name == config.base_name:
            raise APIError(400, f"{body.name!r} is the base model's name", param="name")
        await client.add_adapter(body.name, body.path)
        return ModelCard(id=body.name, created=int(time.time()), parent=config.base_name)

    @app.delete("/admin/adapters/{name}", response_model=AdapterDeleted, responses=admin_errors,
                dependencies=[Depends(admin)])
    async def remove_adapter(name: str):
        await client.remove_adapter(name)
        return AdapterDeleted(id=name)

    return app
