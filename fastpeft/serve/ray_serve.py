"""``fastpeft serve`` beyond one machine: a Ray Serve application of replicas of the continuous-batching server.

Layout (``build_app``):

* ``OpenAIIngress`` (one replica, behind Ray's HTTP proxy): the OpenAI routes. It answers ``/v1/models`` and
  ``/health`` itself, checks a request's JSON and its ``model`` (400 / 404 listing the adapters, before any replica
  is involved) and hands the request to a ``TenantReplica`` with ``multiplexed_model_id`` = the adapter's name. The
  adapter is read from the request body, which Ray's proxy never looks at (its multiplexing routes by a header), so
  OpenAI clients need no extra header.
* ``TenantReplica`` (``num_replicas`` of them): each runs fastpeft's own server (``build_server``: an
  ``AdapterBank``, the continuous-batching ``Engine`` and the stdlib HTTP front) on a private loopback port and
  relays requests to it, so every OpenAI detail (errors, stop strings, streaming, 429 on a full queue) is the
  single-machine server's. Adapters load on demand through ``serve.multiplexed``: Ray sends an adapter's requests to
  replicas that already hold it and evicts the least recently used one past ``max_adapters_per_replica``. Batching
  stays inside each replica, where rows of different adapters share one forward (Ray's own ``serve.batch`` splits
  batches by model id, which is what fastpeft exists to avoid).

Every replica loads the base model itself (``model_dir``, or the built-in model when None) and reads adapters from
``adapters_dir`` by name (a subfolder holding ``adapter_config.json``), so the folder must be reachable from every
node (a shared filesystem, or the same path synced to each node).

Ray is optional: ``pip install "ray[serve]"``; importing this module without it raises ImportError naming that.
"""

import asyncio
import json
import os
import urllib.error
import urllib.request

try:
    from ray import serve
except ImportError as error:  # pragma: no cover - exercised only where Ray is missing
    raise ImportError('fastpeft.serve.ray_serve needs Ray Serve: pip install "ray[serve]"') from error

from . import adapter_dirs

RELAY_TIMEOUT_S = 600
# The single-machine server's routes a replica serves; the ingress answers the others itself.
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


def _error_body(status, message, param=None):
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": error_type, "param": param, "code": status}}).encode()


class _LoadedAdapter:
    """An adapter held by a replica's bank; Ray drops it (LRU) past ``max_adapters_per_replica``, and then
    ``__del__`` frees its bank entry (the engine first ends that adapter's running requests with an error)."""

    def __init__(self, engine, name):
        self.engine, self.name = engine, name

    def __del__(self):
        try:
            self.engine.remove_adapter(self.name)
        except Exception:  # the engine may already be stopped at interpreter shutdown
            pass


@serve.deployment
class TenantReplica:
    """One fastpeft server: base model, bank, continuous-batching engine; adapters loaded on demand."""

    def __init__(self, adapters_dir, model_dir=None, base_name=None, max_batch=16, max_len=512, max_queue=64,
                 max_tokens_limit=256, default_temperature=1.0, max_adapters_per_replica=16):
        from .. import loading
        from . import build_server

        loading.prepare_transformers()
        if model_dir is None:
            from .. import tiny

            model, tokenizer = tiny.build_model(), tiny.build_tokenizer()
        else:
            model, tokenizer = loading.load_base(model_dir, "cpu")
        self.adapters_dir = adapters_dir
        self.server = build_server(model, tokenizer, {}, base_name=base_name or _base_name(model_dir),
                                   max_batch=max_batch, max_len=max_len, max_queue=max_queue,
                                   max_tokens_limit=max_tokens_limit, default_temperature=default_temperature)
        self.server.start()
        engine = self.server.serve_config.engine

        async def load(name):
            await asyncio.to_thread(engine.add_adapter, name, os.path.join(adapters_dir, name))
            return _LoadedAdapter(engine, name)

        # serve.multiplexed fixes its capacity when it decorates; decorating a function per instance (Ray keeps its
        # LRU state on the function) lets the constructor choose it.
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)(load)

    def replica_id(self):
        return serve.get_replica_context().replica_id.unique_id

    def loaded_adapters(self):
        return sorted(self.server.serve_config.engine.adapter_names())

    async def _prepare(self):
        name = serve.get_multiplexed_model_id()
        if name:
            await self.load_adapter(name)

    async def relay(self, path, body):
        """``(status, content type, body bytes, replica id)`` of ``POST path`` on this replica's server."""
        await self._prepare()
        return (*await asyncio.to_thread(self._post, path, body), self.replica_id())

    async def relay_stream(self, path, body):
        """The server-sent events of a streamed ``POST path``, chunk by chunk as the server writes them."""
        await self._prepare()
        response = await asyncio.to_thread(self._open, path, body)
        try:
            while True:
                line = await asyncio.to_thread(response.readline)
                if not line:
                    break
                yield line
        finally:
            # Closing the connection is how the server learns a client went away: its slot is freed.
            response.close()

    def _open(self, path, body):
        request = urllib.request.Request(self.server.url + path, data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=RELAY_TIMEOUT_S)
        except urllib.error.HTTPError as error:  # an error status is an answer to relay, not a failure
            return error

    def _post(self, path, body):
        with self._open(path, body) as response:
            return response.status, response.headers.get("Content-Type", "application/json"), response.read()

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.close()


def _base_name(model_dir):
    return "fastpeft-tiny" if model_dir is None else os.path.basename(os.path.normpath(model_dir))


@serve.deployment
class OpenAIIngress:
    """The OpenAI routes in front of the replicas (see the module docstring)."""

    def __init__(self, replicas, adapters_dir, base_name):
        self.replicas, self.adapters_dir, self.base_name = replicas, adapters_dir, base_name

    def _adapters(self):
        return sorted(adapter_dirs(self.adapters_dir))  # read per request: adapters added to the folder appear

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response, StreamingResponse

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path == "/v1/models":
            names = [self.base_name, *self._adapters()]
            return JSONResponse({"object": "list", "data": [
                {"id": name, "object": "model", "owned_by": "fastpeft",
                 "root": name if name == self.base_name else self.base_name} for name in names]})
        if request.method == "GET" and path == "/health":
            return JSONResponse({"status": "ok"})
        if request.method != "POST" or path not in GENERATION_ROUTES:
            return Response(_error_body(404, f"no route {request.method} {path}"), status_code=404,
                            media_type="application/json")
        body = await request.body()
        try:
            payload = json.loads(body)
        except ValueError as error:
            return Response(_error_body(400, f"the body is not valid JSON: {error}"), status_code=400,
                            media_type="application/json")
        if not isinstance(payload, dict):
            return Response(_error_body(400, "the body must be a JSON object"), status_code=400,
                            media_type="application/json")
        model = payload.get("model", self.base_name)
        adapters = self._adapters()
        if model != self.base_name and model not in adapters:
            message = f"model {model!r} does not exist; served: {[self.base_name, *adapters]}"
            return Response(_error_body(404, message, param="model"), status_code=404,
                            media_type="application/json")
        handle = self.replicas.options(multiplexed_model_id="" if model == self.base_name else model)
        if payload.get("stream"):
            chunks = handle.options(stream=True).relay_stream.remote(path, body)
            return StreamingResponse(chunks, media_type="text/event-stream")
        status, content_type, answer, replica = await handle.relay.remote(path, body)
        return Response(answer, status_code=status, media_type=content_type,
                        headers={"x-fastpeft-replica": replica})


def build_app(adapters_dir, model_dir=None, base_name=None, num_replicas=2, max_adapters_per_replica=16,
              replica_cpus=1, **server_options):
    """The Ray Serve application: ``serve.run(build_app(...))`` (after ``ray.init``) serves it on Ray's HTTP proxy.

    Arguments:
        adapters_dir: a folder of PEFT adapter subfolders (served by subfolder name), reachable from every node.
        model_dir: the base model directory on every node (None: the built-in model).
        base_name: the base model's served name (default: the directory's name, or ``fastpeft-tiny``).
        num_replicas: ``TenantReplica`` count; each holds the base model and up to ``max_adapters_per_replica``
            adapters (least recently used evicted past that).
        replica_cpus: CPUs Ray reserves per replica (``ray_actor_options``; pass GPUs the same way for CUDA).
        server_options: ``max_batch``, ``max_len``, ``max_queue``, ``max_tokens_limit``, ``default_temperature`` of
            each replica's server (``fastpeft serve``'s flags).
    """
    if not os.path.isdir(adapters_dir):
        raise ValueError(f"adapters_dir {adapters_dir!r} is not a directory")
    base_name = base_name or _base_name(model_dir)
    replicas = TenantReplica.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": replica_cpus}).bind(
        adapters_dir, model_dir=model_dir, base_name=base_name, max_adapters_per_replica=max_adapters_per_replica,
        **server_options)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(replicas, adapters_dir, base_name)
