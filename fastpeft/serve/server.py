"""The HTTP front of ``fastpeft serve``: OpenAI-compatible completions over the continuous-batching ``Engine``.

Standard library only (``http.server``, one thread per connection; the model runs on the engine's one thread).

Endpoints:
    GET  /v1/models                  the base model and every adapter (``id`` = the name a request's ``model`` uses)
    POST /v1/completions             ``{"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                                     "stream", "n", "logprobs", "echo"}`` (and vLLM's ``top_k``,
                                     ``repetition_penalty``)
    POST /v1/chat/completions        ``{"model", "messages", ..., "logprobs", "top_logprobs"}`` (the tokenizer's chat
                                     template, else plain lines)
    GET  /health                     ``{"status": "ok", "running", "waiting", ...}``
    POST /admin/adapters             ``{"name", "path"}``: load a PEFT adapter directory (bearer token)
    DELETE /admin/adapters/NAME      remove it (bearer token); its running requests end with an error

A request's ``model`` names its adapter; the base model's name means no adapter. ``temperature`` 0 (or absent with
``--default-temperature 0``) is greedy; sampling, ``top_k`` and ``repetition_penalty`` go through transformers' logits
processors and warpers, per row. ``stop`` strings cut the text and end the request.

A completion's ``prompt`` is a string, a list of strings, a list of token ids or a list of lists of token ids (what
lm-evaluation-harness's ``local-completions`` sends); each prompt gets ``n`` choices (``best_of`` only as ``n``),
numbered prompt-major (prompt p's j-th is choice ``p * n + j``) as OpenAI does. The ``n`` continuations of a prompt
are prefilled once; with a ``seed`` continuation j samples from ``seed + j``. ``logprobs: k`` (0 ..
``MAX_LOGPROBS`` = 20) returns OpenAI's legacy log-probabilities per choice (``logprobs.py``), the end-of-sequence
token that ended a choice last (as vLLM); ``echo: true`` puts the prompt before the completion, its tokens'
log-probabilities first (None for the first token), and ``max_tokens: 0`` scores the prompt alone. Chat takes
``logprobs: true`` and ``top_logprobs: k``. Log-probabilities are the adapter's model's, before any sampling
transform (``engine.py``). ``"return_token_ids": true``
adds the generated ids to each choice and ``"ignore_eos": true`` generates past end-of-sequence tokens (both as
vLLM). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad request, 401 bad
token, 403 admin off, 404 unknown model or route, 409 adapter removed mid-request, 413 body too large, 429 queue
full, 500 internal error.
"""

import hmac
import json
import queue
import select
import socket
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import MAX_LOGPROBS, GenerationRequest, QueueFull, continuations
from .logprobs import chat_logprobs, completion_logprobs

MAX_BODY_BYTES = 1 << 20
EVENT_TIMEOUT_S = 300    # longest wait for the next token
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still connected


def _stop_strings(body):
    """The request's ``stop`` as a list of at most 4 non-empty strings (400 otherwise)."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
        raise HTTPError(400, "stop must be a non-empty string or a list of at most 4 of them", param="stop")
    return stops


def _cut_at_stop(text, stops):
    """(text before the first stop string, True) when one occurs, else (text, False)."""
    positions = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return (text[:min(positions)], True) if positions else (text, False)


def _held_back(text, stops):
    """How many trailing characters of ``text`` could begin a stop string (not sent while streaming)."""
    return max([k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])], default=0)


class HTTPError(Exception):
    def __init__(self, status, message, param=None, error_type=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")


class ServeConfig:
    """What the handlers need: the engine, the tokenizer, the base model's served name and the limits."""

    def __init__(self, engine, tokenizer, base_name, admin_token=None, max_tokens_limit=256,
                 default_max_tokens=16, default_temperature=1.0):
        self.engine, self.tokenizer, self.base_name = engine, tokenizer, base_name
        self.admin_token = admin_token
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.default_temperature = default_temperature
        self.created = int(time.time())


class Handler(BaseHTTPRequestHandler):
    server_version = "fastpeft-serve"
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when the connection closes

    def log_message(self, format, *args):  # quiet by default; the CLI turns access logs on with --log-requests
        if getattr(self.server, "log_requests", False):
            super().log_message(format, *args)

    @property
    def config(self):
        return self.server.serve_config

    # ----- plumbing --------------------------------------------------------------------------------------------

    def _send_json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, error):
        self._send_json(error.status, {"error": {"message": error.message, "type": error.error_type,
                                                 "param": error.param, "code": int(error.status)}})

    def _read_json(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise HTTPError(400, "invalid Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise HTTPError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return body

    def _dispatch(self, method):
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if method == "GET" and path == "/v1/models":
                return self._send_json(200, self._models())
            if method == "GET" and path == "/health":
                engine = self.config.engine
                return self._send_json(200, {"status": "ok", "running": engine.running, "waiting": engine.waiting,
                                             **engine.stats})
            if method == "POST" and path == "/v1/completions":
                return self._completion(self._read_json(), chat=False)
            if method == "POST" and path == "/v1/chat/completions":
                return self._completion(self._read_json(), chat=True)
            if path == "/admin/adapters" and method == "POST":
                self._check_admin()
                return self._admin_add(self._read_json())
            if path.startswith("/admin/adapters/") and method == "DELETE":
                self._check_admin()
                return self._admin_remove(urllib.parse.unquote(path[len("/admin/adapters/"):]))
            raise HTTPError(404, f"no route {method} {path}")
        except HTTPError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug or an engine failure: answer 500 rather than drop the connection
            try:
                self._send_error(HTTPError(500, f"{type(exc).__name__}: {exc}"))
            except OSError:
                pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ----- models and admin ------------------------------------------------------------------------------------

    def _models(self):
        config = self.config
        entries = [{"id": config.base_name, "object": "model", "created": config.created, "owned_by": "fastpeft"}]
        entries += [{"id": name, "object": "model", "created": config.created, "owned_by": "fastpeft",
                     "parent": config.base_name} for name in config.engine.adapter_names()]
        return {"object": "list", "data": entries}

    def _check_admin(self):
        token = self.config.admin_token
        if not token:
            raise HTTPError(403, "the admin endpoints are off (start the server with --admin-token or "
                                 "FASTPEFT_ADMIN_TOKEN)", error_type="permission_error")
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPError(401, "missing or wrong bearer token", error_type="authentication_error")

    def _admin_add(self, body):
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise HTTPError(400, "give {\"name\": NAME, \"path\": ADAPTER_DIR}")
        if name == self.config.base_name:
            raise HTTPError(400, f"{name!r} is the base model's name", param="name")
        try:
            self.config.engine.add_adapter(name, path)
        except (ValueError, OSError) as exc:
            raise HTTPError(400, f"cannot add adapter {name!r}: {exc}") from None
        self._send_json(201, {"id": name, "object": "model", "parent": self.config.base_name})

    def _admin_remove(self, name):
        try:
            self.config.engine.remove_adapter(name)
        except KeyError:
            raise HTTPError(404, f"no adapter named {name!r}; loaded: {self.config.engine.adapter_names()}") from None
        self._send_json(200, {"id": name, "object": "model", "deleted": True})

    # ----- completions -----------------------------------------------------------------------------------------

    def _parse(self, body, chat):
        """The request's prompts as groups of ``n`` continuations (``GenerationRequest`` s, one group per prompt),
        each prompt's echo text (completions with ``echo``, else None) and the top-k count of its log-probabilities
        (None: not asked)."""
        config = self.config
        model = body.get("model")
        if not isinstance(model, str):
            raise HTTPError(400, "'model' (a string: the base model's name or an adapter's) is required",
                            param="model")
        adapters = config.engine.adapter_names()
        if model != config.base_name and model not in adapters:
            raise HTTPError(404, f"the model {model!r} does not exist; available: {[config.base_name] + adapters}",
                            param="model", error_type="not_found_error")
        max_tokens = body.get("max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                              config.default_max_tokens)
        if max_tokens is None:
            max_tokens = config.default_max_tokens
        least = 1 if chat else 0  # completions: 0 = score the prompt only (with echo and logprobs)
        if not _is_int(max_tokens) or max_tokens < least:
            raise HTTPError(400, f"max_tokens must be an integer >= {least}, got {max_tokens!r}", param="max_tokens")
        if max_tokens > config.max_tokens_limit:
            raise HTTPError(400, f"max_tokens={max_tokens} exceeds this server's limit of {config.max_tokens_limit}",
                            param="max_tokens")
        temperature = body.get("temperature", config.default_temperature)
        top_p = body.get("top_p", 1.0)
        if temperature is None:
            temperature = config.default_temperature
        if top_p is None:
            top_p = 1.0
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
            raise HTTPError(400, f"temperature must lie in [0, 2], got {temperature!r}", param="temperature")
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
            raise HTTPError(400, f"top_p must lie in (0, 1], got {top_p!r}", param="top_p")
        n = 1 if body.get("n") is None else body["n"]
        if not _is_int(n) or not 1 <= n <= config.engine.max_batch:
            raise HTTPError(400, f"n must be an integer in [1, {config.engine.max_batch}] (this server's batch), got "
                                 f"{n!r}", param="n")
        best_of = body.get("best_of")
        if best_of is not None and (not _is_int(best_of) or best_of != n):
            raise HTTPError(400, f"best_of must equal n ({n}) here: the server returns every continuation it "
                                 f"generates", param="best_of")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not -(1 << 63) <= seed < 1 << 63):
            raise HTTPError(400, f"seed must be a 64-bit signed integer, got {seed!r}", param="seed")
        top_k = body.get("top_k", 0)
        top_k = 0 if top_k in (None, -1) else top_k
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise HTTPError(400, f"top_k must be a non-negative integer (or -1: off), got {top_k!r}", param="top_k")
        penalty = body.get("repetition_penalty", 1.0)
        penalty = 1.0 if penalty is None else penalty
        if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not 0 < penalty <= 10:
            raise HTTPError(400, f"repetition_penalty must lie in (0, 10], got {penalty!r}",
                            param="repetition_penalty")
        _stop_strings(body)
        top_logprobs = _top_logprobs(body, chat)
        echo = False if chat else body.get("echo", False)
        if not isinstance(echo, bool):
            raise HTTPError(400, f"echo must be true or false, got {echo!r}", param="echo")
        prompts = [(self._chat_ids(body.get("messages")), None)] if chat else self._prompts(body.get("prompt"))
        capacity = config.engine.max_batch + config.engine.max_queue
        if len(prompts) * n > capacity:
            raise HTTPError(400, f"{len(prompts)} prompt(s) x n={n} continuations exceed the {capacity} requests this "
                                 f"server holds at once", param="n")
        groups, echo_texts = [], []
        for ids, text in prompts:
            request = GenerationRequest(
                prompt_ids=ids, adapter=None if model == config.base_name else model, max_tokens=max_tokens,
                temperature=float(temperature), top_p=float(top_p), seed=seed,
                ignore_eos=bool(body.get("ignore_eos", False)), top_k=top_k, repetition_penalty=float(penalty),
                logprobs=top_logprobs, prompt_logprobs=top_logprobs if echo else None)
            groups.append(continuations(request, n))
            echo_texts.append((self._decode(ids) if text is None else text) if echo else None)
        return groups, echo_texts, top_logprobs

    def _prompts(self, prompt):
        """``[(token ids, the prompt's text or None)]``: one prompt per string, list of token ids, or list of lists
        of token ids (lm-evaluation-harness sends ``[[ids]]``)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(text, str) for text in prompt):
                prompts = [(self.config.tokenizer(text)["input_ids"], text) for text in prompt]
                if not all(ids for ids, _ in prompts):
                    raise HTTPError(400, "a prompt holds no token", param="prompt")
                return prompts
            if all(_is_int(token) for token in prompt):
                prompt = [prompt]
            if all(isinstance(ids, list) and ids and all(_is_int(token) for token in ids) for ids in prompt):
                vocab = len(self.config.tokenizer)
                if not all(0 <= token < vocab for ids in prompt for token in ids):
                    raise HTTPError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
                return [(list(ids), None) for ids in prompt]
        raise HTTPError(400, "prompt must be a string, a list of strings, a non-empty list of token ids or a list of "
                             "them", param="prompt")

    def _chat_ids(self, messages):
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise HTTPError(400, "messages must be a non-empty list of {\"role\": str, \"content\": str}",
                            param="messages")
        tokenizer = self.config.tokenizer
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        # No chat template (the built-in model): one "role: content" line per message, then "assistant:".
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenizer(text)["input_ids"]

    def _completion(self, body, chat):
        groups, echo_texts, top_logprobs = self._parse(body, chat)
        stream = bool(body.get("stream", False))
        # Every choice's request puts its events on this one queue, tagged with the choice's index (prompt-major:
        # prompt p's continuation j is choice p * n + j, as OpenAI numbers them).
        shared = queue.Queue()
        choices = []
        for group, echo_text in zip(groups, echo_texts):
            for request in group:
                request.events = _TaggedEvents(shared, len(choices))
                choices.append(_Choice(len(choices), request, echo_text))
        try:
            try:
                for group in groups:
                    self.config.engine.submit(group)
            except QueueFull as exc:
                raise HTTPError(429, f"the server is busy: {exc}; retry later",
                                error_type="rate_limit_error") from None
            except ValueError as exc:
                raise HTTPError(400, str(exc), param="max_tokens") from None
            completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            updates = self._updates(shared, choices, _stop_strings(body))
            if stream:
                self._stream(updates, choices, body, chat, completion_id, top_logprobs)
            else:
                self._whole(updates, choices, groups, body, chat, completion_id, top_logprobs)
        finally:
            # A request still running here lost its client (or the response failed): the engine frees its slot, or
            # its place in the queue, at the next token boundary.
            for choice in choices:
                if choice.request.finish_reason is None:
                    choice.request.cancel()

    def _client_gone(self):
        """Whether the client closed its connection. It sends nothing after its request (one request per
        connection), so a readable socket that yields no byte means it went away."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _updates(self, shared, choices, stops):
        """Feed the choices their engine events (taken from ``shared``) and yield each choice whose text or end
        changed, until every choice ended; raises HTTPError for an engine-side error. While waiting (queued, or
        between tokens), a client that disconnected ends the call (``ConnectionResetError``; its requests are
        cancelled), streamed or not."""
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while any(choice.finish_reason is None for choice in choices):
            try:
                index, kind, value = shared.get(timeout=DISCONNECT_POLL_S)
            except queue.Empty:
                kind = None
            now = time.monotonic()
            if now >= next_check:
                next_check = now + DISCONNECT_POLL_S
                if self._client_gone():
                    raise ConnectionResetError("the client disconnected")
            if kind is None:
                if now > deadline:
                    raise HTTPError(504, "generation timed out")
                continue
            deadline = now + EVENT_TIMEOUT_S
            if kind == "error":
                raise HTTPError(409 if "removed" in value else 500, value)
            choice = choices[index]
            if choice.finish_reason is None and choice.feed(kind, value, self._decode, stops):
                yield choice

    def _decode(self, ids):
        return self.config.tokenizer.decode(ids, skip_special_tokens=True)

    def _whole(self, updates, choices, groups, body, chat, completion_id, top_logprobs):
        for _ in updates:
            pass
        tokenizer = self.config.tokenizer
        entries = []
        for choice in choices:
            entry = {"index": choice.index, "finish_reason": choice.finish_reason}
            if chat:
                entry["message"] = {"role": "assistant", "content": choice.text}
                entry["logprobs"] = None if top_logprobs is None else chat_logprobs(tokenizer, choice.ids,
                                                                                    choice.logprobs)
            else:
                entry["text"] = choice.full_text
                entry["logprobs"] = None if top_logprobs is None else completion_logprobs(
                    tokenizer, *choice.logprob_tokens())[0]
            if body.get("return_token_ids"):
                entry["token_ids"] = list(choice.ids)
            entries.append(entry)
        prompt_tokens = sum(len(group[0].prompt_ids) for group in groups)
        completion_tokens = sum(len(choice.ids) for choice in choices)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        self._send_json(200, {"id": completion_id, "object": "chat.completion" if chat else "text_completion",
                              "created": int(time.time()), "model": body["model"], "choices": entries,
                              "usage": usage})

    def _stream(self, updates, choices, body, chat, completion_id, top_logprobs):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        created, model = int(time.time()), body["model"]
        kind_name = "chat.completion.chunk" if chat else "text_completion"
        want_ids, stops = bool(body.get("return_token_ids")), _stop_strings(body)
        tokenizer = self.config.tokenizer
        # Per choice: the text sent, the generated tokens sent, the tokens whose log-probabilities were sent (an
        # echoed prompt's included) and the legacy text_offset reached.
        count = len(choices)
        sent_text, sent_ids, sent_logprobs, sent_offset = [""] * count, [0] * count, [0] * count, [0] * count

        def send(choice, delta_text, reason=None, first=False):
            i = choice.index
            if chat:
                delta = {"role": "assistant", "content": delta_text} if first else (
                    {"content": delta_text} if delta_text else {})
                entry = {"index": i, "delta": delta, "finish_reason": reason}
                if top_logprobs is not None and not first:
                    entry["logprobs"] = chat_logprobs(tokenizer, choice.ids[sent_ids[i]:],
                                                      choice.logprobs[sent_ids[i]:])
            else:
                entry = {"index": i, "text": delta_text, "logprobs": None, "finish_reason": reason}
                if top_logprobs is not None:
                    tokens, logprobs = choice.logprob_tokens()
                    done, sent_logprobs[i] = sent_logprobs[i], len(tokens)
                    entry["logprobs"], sent_offset[i] = completion_logprobs(tokenizer, tokens[done:],
                                                                            logprobs[done:], sent_offset[i])
            if want_ids and not first:
                entry["token_ids"] = choice.ids[sent_ids[i]:]
            if not first:
                sent_ids[i] = len(choice.ids)
            chunk = {"id": completion_id, "object": kind_name, "created": created, "model": model,
                     "choices": [entry]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        if chat:
            for choice in choices:
                send(choice, "", first=True)
        try:
            for choice in updates:
                i, text = choice.index, choice.full_text
                if choice.finish_reason is not None:
                    send(choice, text[len(sent_text[i]):] if text.startswith(sent_text[i]) else "",
                         reason=choice.finish_reason)
                    continue
                # Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until its next bytes arrive, and text
                # that may begin a stop string.
                stable = text.rstrip("\ufffd")
                stable = stable[:len(stable) - _held_back(stable, stops)]
                if stable.startswith(sent_text[i]) and len(stable) > len(sent_text[i]):
                    send(choice, stable[len(sent_text[i]):])
                    sent_text[i] = stable
        except HTTPError as error:
            payload = {"error": {"message": error.message, "type": error.error_type, "param": None,
                                 "code": int(error.status)}}
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _top_logprobs(body, chat):
    """How many alternatives per token the request asks for (None: no log-probabilities). Completions:
    ``logprobs: k``; chat: ``logprobs: true`` with ``top_logprobs: k`` (default 0)."""
    if chat:
        wanted, count, name = body.get("logprobs"), body.get("top_logprobs"), "top_logprobs"
        if wanted is not None and not isinstance(wanted, bool):
            raise HTTPError(400, f"logprobs must be true or false, got {wanted!r}", param="logprobs")
        if not wanted:
            if count is not None:
                raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        count = 0 if count is None else count
    else:
        count, name = body.get("logprobs"), "logprobs"
        if count is None:
            return None
    if not _is_int(count) or not 0 <= count <= MAX_LOGPROBS:
        raise HTTPError(400, f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {count!r}", param=name)
    return count


class _TaggedEvents:
    """A request's ``events``: each event goes onto its HTTP call's one queue as ``(choice index, kind, value)``, so
    one handler waits on every choice of a call (``n``, several prompts) at once."""

    def __init__(self, shared, index):
        self.shared, self.index = shared, index

    def put(self, event):
        self.shared.put((self.index, *event))


class _Choice:
    """One choice of a completion, built from its request's engine events: the generated ids, their log-probabilities
    (when asked), the prompt's (echo) and the text, stop strings applied."""

    def __init__(self, index, request, echo_text=None):
        self.index, self.request, self.echo_text = index, request, echo_text
        self.ids, self.logprobs, self.prompt_logprobs, self.end_logprob = [], [], None, None
        self.text, self.finish_reason = "", None
        self._next_logprob = None  # the engine sends a token's log-probabilities just before the token

    def feed(self, kind, value, decode, stops):
        """Take one engine event; True when the text or the end changed. A stop string ends the choice (cancelled
        in the engine) with the text cut before it and finish_reason ``"stop"``."""
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
                self.request.cancel()
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
            ids, entries = self.request.prompt_ids + ids, self.prompt_logprobs + entries
        if self.end_logprob is not None:
            ids, entries = ids + [self.end_logprob.token], entries + [self.end_logprob]
        return ids, entries


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # listen backlog (socketserver's default of 5 resets bursts of concurrent clients)

    def __init__(self, address, serve_config, log_requests=False):
        super().__init__(address, Handler)
        self.serve_config, self.log_requests = serve_config, log_requests

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        """Serve in a background thread (the engine must be started); returns self."""
        self._serve_thread = threading.Thread(target=self.serve_forever, name="fastpeft-http", daemon=True)
        self._serve_thread.start()
        return self

    def close(self):
        self.shutdown()
        self.server_close()
        self.serve_config.engine.stop()
