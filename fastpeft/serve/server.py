"""The HTTP front of ``fastpeft serve``: OpenAI-compatible completions over the continuous-batching ``Engine``.

Standard library only (``http.server``, one thread per connection; the model runs on the engine's one thread).

Endpoints:
    GET  /v1/models                  the base model and every adapter (``id`` = the name a request's ``model`` uses)
    POST /v1/completions             ``{"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                                     "stream"}`` (and vLLM's ``top_k``, ``repetition_penalty``)
    POST /v1/chat/completions        ``{"model", "messages", ...}`` (the tokenizer's chat template, else plain lines)
    GET  /health                     ``{"status": "ok", "running", "waiting", ...}``
    POST /admin/adapters             ``{"name", "path"}``: load a PEFT adapter directory (bearer token)
    DELETE /admin/adapters/NAME      remove it (bearer token); its running requests end with an error

A request's ``model`` names its adapter; the base model's name means no adapter. ``temperature`` 0 (or absent with
``--default-temperature 0``) is greedy; sampling, ``top_k`` and ``repetition_penalty`` go through transformers' logits
processors and warpers, per row. ``stop`` strings cut the text and end the request. ``"return_token_ids": true``
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

from .engine import GenerationRequest, QueueFull

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
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise HTTPError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
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
        if body.get("n", 1) != 1:
            raise HTTPError(400, "only n=1 is supported", param="n")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise HTTPError(400, f"seed must be an integer, got {seed!r}", param="seed")
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
        prompt_ids = self._chat_ids(body.get("messages")) if chat else self._prompt_ids(body.get("prompt"))
        return GenerationRequest(prompt_ids=prompt_ids, adapter=None if model == config.base_name else model,
                                 max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                                 seed=seed, ignore_eos=bool(body.get("ignore_eos", False)), top_k=top_k,
                                 repetition_penalty=float(penalty))

    def _prompt_ids(self, prompt):
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.config.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = len(self.config.tokenizer)
            if not all(0 <= t < vocab for t in prompt):
                raise HTTPError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            return list(prompt)
        raise HTTPError(400, "prompt must be a string, a list of one string or a list of token ids "
                             "(one prompt per request)", param="prompt")

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
        request = self._parse(body, chat)
        stream = bool(body.get("stream", False))
        try:
            self.config.engine.submit(request)
        except QueueFull as exc:
            raise HTTPError(429, f"the server is busy: {exc}; retry later", error_type="rate_limit_error") from None
        except ValueError as exc:
            raise HTTPError(400, str(exc), param="max_tokens") from None
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            if stream:
                self._stream(request, body, chat, completion_id)
            else:
                self._whole(request, body, chat, completion_id)
        except (BrokenPipeError, ConnectionResetError, OSError):
            request.cancel()  # the client went away: the engine frees the slot at the next token boundary
            raise
        finally:
            if request.finish_reason is None:
                request.cancel()

    def _client_gone(self):
        """Whether the client closed its connection. It sends nothing after its request (one request per
        connection), so a readable socket that yields no byte means it went away."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _events(self, request):
        """Yield the request's events until it ends; raises HTTPError for an engine-side error. While waiting
        (queued, or between tokens), a client that disconnected cancels the request: its slot, or its place in the
        queue, is freed at the next token boundary, streamed or not."""
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while True:
            try:
                kind, value = request.events.get(timeout=DISCONNECT_POLL_S)
            except queue.Empty:
                kind = None
            now = time.monotonic()
            if now >= next_check:
                next_check = now + DISCONNECT_POLL_S
                if self._client_gone():
                    request.cancel()
                    raise ConnectionResetError("the client disconnected")
            if kind is None:
                if now > deadline:
                    request.cancel()
                    raise HTTPError(504, "generation timed out")
                continue
            deadline = now + EVENT_TIMEOUT_S
            if kind == "error":
                raise HTTPError(409 if "removed" in value else 500, value)
            yield kind, value
            if kind == "done":
                return

    def _decode(self, ids):
        return self.config.tokenizer.decode(ids, skip_special_tokens=True)

    def _tokens(self, request, stops):
        """Yield ``(ids so far, text so far, finish_reason or None)`` per event; a stop string ends the request
        (cancelled in the engine) with the text cut before it and finish_reason ``"stop"``."""
        ids = []
        for kind, value in self._events(request):
            if kind == "done":
                yield ids, self._decode(ids), value
                return
            ids.append(value)
            text = self._decode(ids)
            if stops:
                text, stopped = _cut_at_stop(text, stops)
                if stopped:
                    request.cancel()
                    yield ids, text, "stop"
                    return
            yield ids, text, None

    def _whole(self, request, body, chat, completion_id):
        ids, text, reason = [], "", None
        for ids, text, reason in self._tokens(request, _stop_strings(body)):
            pass
        choice = {"index": 0, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        if body.get("return_token_ids"):
            choice["token_ids"] = list(ids)
        usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(ids),
                 "total_tokens": len(request.prompt_ids) + len(ids)}
        self._send_json(200, {"id": completion_id, "object": "chat.completion" if chat else "text_completion",
                              "created": int(time.time()), "model": body["model"], "choices": [choice],
                              "usage": usage})

    def _stream(self, request, body, chat, completion_id):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        created, model = int(time.time()), body["model"]
        kind_name = "chat.completion.chunk" if chat else "text_completion"
        want_ids, stops = bool(body.get("return_token_ids")), _stop_strings(body)

        def send(delta_text, reason=None, token_ids=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": delta_text} if first else (
                    {"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text, "logprobs": None, "finish_reason": reason}
            if want_ids and token_ids is not None:
                choice["token_ids"] = token_ids
            chunk = {"id": completion_id, "object": kind_name, "created": created, "model": model,
                     "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        if chat:
            send("", first=True)
        sent_text, sent_ids = "", 0
        try:
            for ids, text, reason in self._tokens(request, stops):
                if reason is not None:
                    send(text[len(sent_text):] if text.startswith(sent_text) else "", reason=reason,
                         token_ids=ids[sent_ids:])
                    break
                # Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until its next bytes arrive, and text
                # that may begin a stop string.
                stable = text.rstrip("\ufffd")
                stable = stable[:len(stable) - _held_back(stable, stops)]
                if stable.startswith(sent_text) and len(stable) > len(sent_text):
                    send(stable[len(sent_text):], token_ids=ids[sent_ids:])
                    sent_text, sent_ids = stable, len(ids)
        except HTTPError as error:
            payload = {"error": {"message": error.message, "type": error.error_type, "param": None,
                                 "code": int(error.status)}}
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


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
