"""``fastpeft serve`` beyond one machine: the same FastAPI app (``app.py``) as a Ray Serve ingress, over replicas that
each run the continuous-batching engine in-process.

Layout (``build_app``):

* ``OpenAIIngress`` (behind Ray's HTTP proxy, ``@serve.ingress``): the app of the single-machine server, built per
  replica (``__serve_build_asgi_app__``) over ``RayEngineClient`` instead of an in-process engine. It tokenizes,
  validates (every 4xx of the single-machine server), cuts stop strings and writes whole responses or server-sent
  events exactly as that server does. The served adapters are the subfolders of ``adapters_dir`` (read per
  request: an adapter added to the folder appears); admin routes answer 403.
* ``TenantReplica`` (``num_replicas`` of them): the base model, an ``AdapterBank`` and the ``Engine``, in the replica
  process. The ingress calls its ``generate`` through a deployment handle with ``multiplexed_model_id`` = the
  request's adapter: Ray routes an adapter's requests to replicas that already hold it, loads it on first use
  (``serve.multiplexed``) and evicts the least recently used one past ``max_adapters_per_replica``. ``generate`` is a
  streaming method: the ingress reads the engine's events through a handle generator, token by token, so no HTTP
  runs between the ingress and a replica. Batching stays inside each replica, where rows of different adapters share
  one forward (Ray's own ``serve.batch`` splits batches by model id, which is what fastpeft exists to avoid).

A client that goes away cancels the handle generator; the replica then cancels the request in its engine.

Every replica loads the base model itself (``model_dir``, or the built-in model when None) and reads adapters from
``adapters_dir`` by name, so the folder must be reachable from every node (a shared filesystem, or the same path
synced to each node). The ingress loads the tokenizer of ``model_dir``.

Ray is optional: ``pip install "fastpeft[ray]"``; importing this module without it raises ImportError naming that.
"""

import asyncio
import os
import time

try:
    from ray import serve
except ImportError as error:  # pragma: no cover - exercised only where Ray is missing
    raise ImportError('fastpeft.serve.ray_serve needs Ray Serve: pip install "fastpeft[ray]"') from error

from . import adapter_dirs
from .app import ServeConfig, create_app
from .engine import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_PREFILL_TOKENS
from .engine_client import EngineClient
from .protocol import APIError


class _LoadedAdapter:
    """An adapter held by a replica's bank. Ray drops it (least recently used) past ``max_adapters_per_replica`` and
    calls ``__del__``, which frees its bank entry (the engine first ends that adapter's running requests with an
    error); Python calls ``__del__`` again when the object goes, which then does nothing."""

    def __init__(self, engine, name):
        self.engine, self.name, self.released = engine, name, False

    def __del__(self):
        if self.released:
            return
        self.released = True
        try:
            self.engine.remove_adapter(self.name)
        except Exception:  # the engine may be stopped already (interpreter shutdown)
            pass


def _base_name(model_dir):
    return "fastpeft-tiny" if model_dir is None else os.path.basename(os.path.normpath(model_dir))


@serve.deployment
class TenantReplica:
    """One engine (base model, bank, continuous batching) in this replica's process; adapters loaded on demand."""

    def __init__(self, adapters_dir, model_dir=None, max_batch=16, max_len=512, max_queue=64,
                 max_adapters_per_replica=16, kv_block_size=DEFAULT_BLOCK_SIZE, kv_cache_tokens=None,
                 kv_cache_bytes=None, max_prefill_tokens=DEFAULT_MAX_PREFILL_TOKENS):
        from .. import loading
        from ..bank import AdapterBank
        from .engine import Engine

        loading.prepare_transformers()
        if model_dir is None:
            from .. import tiny

            model = tiny.build_model()
        else:
            model, _ = loading.load_base(model_dir, "cpu")
        self.engine = Engine(AdapterBank(model), max_batch=max_batch, max_len=max_len, max_queue=max_queue,
                             block_size=kv_block_size, kv_cache_tokens=kv_cache_tokens, kv_cache_bytes=kv_cache_bytes,
                             max_prefill_tokens=max_prefill_tokens).start()
        self.client = EngineClient(self.engine)

        async def load(name):
            await asyncio.to_thread(self.engine.add_adapter, name, os.path.join(adapters_dir, name))
            return _LoadedAdapter(self.engine, name)

        # serve.multiplexed fixes its capacity when it decorates; decorating a function per instance (Ray keeps its
        # LRU state on the function) lets the constructor choose it.
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)(load)

    async def generate(self, fields):
        """Stream one request: first ``("accepted", replica id)`` or ``("refused", status, message, param)``, then
        the engine's ``("token", id)`` events (``"logprobs"``/``"prompt_logprobs"`` ones too when asked), then ``("done", finish_reason)`` or ``("error", status, message)``.
        ``fields``: ``GenerationRequest``'s keyword arguments; the adapter is the handle's multiplexed model id."""
        name = serve.get_multiplexed_model_id()
        if name:
            try:
                await self.load_adapter(name)
            except Exception as error:  # a broken adapter folder: the server's fault, not the request's
                yield ("refused", 500, f"cannot load adapter {name!r}: {error}", None)
                return
        try:
            stream, = await self.client.open(fields)
        except APIError as error:
            yield ("refused", error.status, error.message, error.param)
            return
        yield ("accepted", serve.get_replica_context().replica_id.unique_id)
        try:
            async for event in stream:
                yield event
        except APIError as error:
            yield ("error", error.status, error.message)
            return
        finally:
            if stream.finish_reason is None:  # the ingress cancelled this generator: its client went away
                stream.cancel()
        yield ("done", stream.finish_reason)

    def loaded_adapters(self):
        return sorted(self.engine.adapter_names())

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


class _RayStream:
    """``GenerationStream``'s interface over a ``TenantReplica.generate`` handle generator."""

    def __init__(self, response, replica, submitted_at):
        self.response, self.served_by, self.submitted_at = response, replica, submitted_at
        self.finish_reason = None

    def cancel(self):
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.response.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finish_reason is not None:
            raise StopAsyncIteration
        try:
            event = await self.response.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the replica ended the stream without a finish reason") from None
        except Exception as error:
            if self.finish_reason == "cancelled":  # cancel() while waiting: Ray raises its cancellation here
                raise StopAsyncIteration from None
            raise APIError(500, f"the replica failed: {type(error).__name__}: {error}") from error
        kind = event[0]
        if kind == "done":
            self.finish_reason = event[1]
            raise StopAsyncIteration
        if kind == "error":
            self.finish_reason = "error"
            raise APIError(event[1], event[2])
        return event


class RayEngineClient:
    """The app's generation client in a Ray ingress: requests go to ``TenantReplica`` s through ``replicas`` (a
    deployment handle), routed by adapter; the adapters are the subfolders of ``adapters_dir``."""

    def __init__(self, replicas, adapters_dir):
        self.replicas, self.adapters_dir = replicas, adapters_dir

    def adapter_names(self):
        return list(adapter_dirs(self.adapters_dir))  # read per request: adapters added to the folder appear

    async def open(self, fields, n=1):
        """``n`` streams continuing ``fields``' prompt, continuation j seeded ``seed + j`` as in one engine. Each is
        its own replica request (prefilled on its own); one refused cancels those already opened."""
        streams = []
        try:
            for j in range(n):
                seed = fields["seed"]
                streams.append(await self._open_one({**fields, "seed": None if seed is None else seed + j}))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    async def _open_one(self, fields):
        submitted_at = time.monotonic()
        handle = self.replicas.options(stream=True, multiplexed_model_id=fields["adapter"] or "")
        response = handle.generate.remote(fields)
        try:
            first = await response.__anext__()
        except BaseException:  # cancelled (the client went away) or the replica failed: stop its generator
            response.cancel()
            raise
        if first[0] == "refused":
            _, status, message, param = first
            raise APIError(status, message, param=param)
        return _RayStream(response, first[1], submitted_at)

    async def add_adapter(self, name, path):
        raise self._admin_off()

    async def remove_adapter(self, name):
        raise self._admin_off()

    @staticmethod
    def _admin_off():
        return APIError(403, "under Ray Serve the adapters folder is the source of truth: add or remove its "
                             "subfolders")

    def health(self):
        return {}

    def gauges(self):
        return None  # the engines run in the replicas; Ray's own metrics cover them


@serve.deployment
@serve.ingress()
class OpenAIIngress:
    """The OpenAI routes in front of the replicas (see the module docstring)."""

    def __init__(self, replicas, adapters_dir, model_dir, base_name, max_tokens_limit=256, default_max_tokens=16,
                 default_temperature=1.0, max_choices=16, max_request_choices=80):
        from .. import loading

        loading.prepare_transformers()
        if model_dir is None:
            from .. import tiny

            tokenizer = tiny.build_tokenizer()
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.client = RayEngineClient(replicas, adapters_dir)
        self.config = ServeConfig(tokenizer, base_name, max_tokens_limit=max_tokens_limit,
                                  default_max_tokens=default_max_tokens, default_temperature=default_temperature,
                                  max_choices=max_choices, max_request_choices=max_request_choices)

    def __serve_build_asgi_app__(self):
        # Ray calls this once the constructor ran, so the app is built around this replica's handle and tokenizer.
        return create_app(self.config, self.client)


def build_app(adapters_dir, model_dir=None, base_name=None, num_replicas=2, max_adapters_per_replica=16,
              replica_cpus=1, max_batch=16, max_len=512, max_queue=64, max_tokens_limit=256, default_max_tokens=16,
              default_temperature=1.0, kv_block_size=DEFAULT_BLOCK_SIZE, kv_cache_tokens=None, kv_cache_bytes=None,
              max_prefill_tokens=DEFAULT_MAX_PREFILL_TOKENS):
    """The Ray Serve application: ``serve.run(build_app(...))`` (after ``ray.init``) serves it on Ray's HTTP proxy.

    Arguments:
        adapters_dir: a folder of PEFT adapter subfolders (served by subfolder name), reachable from every node.
        model_dir: the base model directory on every node (None: the built-in model).
        base_name: the base model's served name (default: the directory's name, or ``fastpeft-tiny``).
        num_replicas: ``TenantReplica`` count; each holds the base model and up to ``max_adapters_per_replica``
            adapters (least recently used evicted past that).
        replica_cpus: CPUs Ray reserves per replica (``ray_actor_options``; pass GPUs the same way for CUDA).
        max_batch, max_len, max_queue, kv_block_size, kv_cache_tokens, kv_cache_bytes, max_prefill_tokens: each
            replica's engine (``fastpeft serve``'s flags).
        max_tokens_limit, default_max_tokens, default_temperature: the ingress's request limits and defaults.
    """
    if not os.path.isdir(adapters_dir):
        raise ValueError(f"adapters_dir {adapters_dir!r} is not a directory")
    base_name = base_name or _base_name(model_dir)
    replicas = TenantReplica.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": replica_cpus}).bind(
        adapters_dir, model_dir=model_dir, max_batch=max_batch, max_len=max_len, max_queue=max_queue,
        max_adapters_per_replica=max_adapters_per_replica, kv_block_size=kv_block_size,
        kv_cache_tokens=kv_cache_tokens, kv_cache_bytes=kv_cache_bytes, max_prefill_tokens=max_prefill_tokens)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(
        replicas, adapters_dir, model_dir, base_name, max_tokens_limit=max_tokens_limit,
        default_max_tokens=default_max_tokens, default_temperature=default_temperature, max_choices=max_batch,
        max_request_choices=max_batch + max_queue)
