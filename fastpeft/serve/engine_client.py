"""The asyncio side of the continuous-batching ``Engine``: what the HTTP app (``app.py``) and a Ray replica
(``ray_serve.py``) call.

The engine runs on a thread of its own and reports each request's progress by ``put`` on the request's ``events``
queue. ``EngineClient.open`` gives the request a ``queue.Queue`` whose ``put`` hands the event to the event loop
(``call_soon_threadsafe``), so a handler awaits its next token without a thread of its own and without polling.
Engine-side failures become ``APIError`` s here, in one place: the app maps them to HTTP.
"""

import asyncio
import queue
import time

from .engine import GenerationRequest, QueueFull, continuations
from .protocol import APIError

EVENT_TIMEOUT_S = 300  # longest wait for a request's next event (queued, or between two tokens): then 504


class _LoopQueue(queue.Queue):
    """A request's ``events`` queue whose items go to an ``asyncio.Queue`` of ``loop`` (the engine thread only
    ever calls ``put``)."""

    def __init__(self, loop):
        super().__init__()
        self.loop, self.pending = loop, asyncio.Queue()

    def put(self, item, block=True, timeout=None):
        try:
            self.loop.call_soon_threadsafe(self.pending.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class GenerationStream:
    """One submitted request's events, awaited: ``async for kind, value in stream`` yields the engine's ``("token",
    id)`` events (and ``"logprobs"``/``"prompt_logprobs"`` ones when the request asked) and ends after ``("done",
    reason)`` (``finish_reason`` then holds the reason). An engine error raises
    ``APIError``: 409 when the request's adapter was removed while it waited or ran, 503 while the server shuts
    down, else 500; no event for ``EVENT_TIMEOUT_S`` raises 504. ``cancel()`` ends the request in the engine at its
    next token boundary and ends the iteration."""

    def __init__(self, client, request, pending):
        self.client, self.request, self.pending = client, request, pending
        self.finish_reason = None
        self.served_by = None  # which replica generates (Ray); None in-process
        self.submitted_at = time.monotonic()

    def cancel(self):
        self.request.cancel()
        self.pending.put_nowait(("cancelled", None))

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finish_reason is not None:
            raise StopAsyncIteration
        try:
            kind, value = await asyncio.wait_for(self.pending.get(), EVENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.request.cancel()
            raise APIError(504, "generation timed out", error_type="timeout_error") from None
        if kind == "cancelled":
            self.finish_reason = "cancelled"
            raise StopAsyncIteration
        if kind == "done":
            self.finish_reason = value
            raise StopAsyncIteration
        if kind == "error":
            raise self.client.error_of(self.request, value)
        return kind, value


class EngineClient:
    """Async access to an in-process, started ``Engine``: submitting requests (``open``), the adapters, and the
    engine's gauges. ``stopping`` is set once the server shuts down, so that requests the engine then ends are
    answered 503."""

    def __init__(self, engine):
        self.engine = engine
        self.stopping = False

    def adapter_names(self):
        return self.engine.adapter_names()

    async def open(self, fields, n=1):
        """Submit ``n`` continuations of ``GenerationRequest(**fields)`` as one group (``engine.continuations``: one
        prefill, continuation j seeded ``seed + j``); their ``GenerationStream`` s. Refusals: 429 when the queue is
        full, 400 when the prompt does not fit the context (``param`` max_tokens) or holds no token."""
        loop = asyncio.get_running_loop()
        group = continuations(GenerationRequest(**fields), n)
        for request in group:
            request.events = _LoopQueue(loop)
        try:
            self.engine.submit(group)
        except QueueFull as error:
            raise APIError(429, f"the server is busy: {error}; retry later") from None
        except ValueError as error:
            raise APIError(400, str(error), param="max_tokens") from None
        return [GenerationStream(self, request, request.events.pending) for request in group]

    def error_of(self, request, failure):
        """The ``APIError`` for the engine's ``("error", RequestFailed)`` on ``request``."""
        status = {"adapter_removed": 409, "adapter_not_loaded": 409, "shutting_down": 503}.get(failure.reason, 500)
        return APIError(503 if self.stopping else status, failure.message)

    async def add_adapter(self, name, path):
        try:
            await asyncio.to_thread(self.engine.add_adapter, name, path)
        except (ValueError, OSError) as error:
            raise APIError(400, f"cannot add adapter {name!r}: {error}") from None

    async def remove_adapter(self, name):
        try:
            await asyncio.to_thread(self.engine.remove_adapter, name)
        except KeyError:
            raise APIError(404, f"no adapter named {name!r}; loaded: {self.adapter_names()}") from None

    def health(self):
        engine = self.engine
        return {"running": engine.running, "waiting": engine.waiting, **engine.stats}

    def gauges(self):
        """``{"running", "waiting", "kv": KVUsage}`` for /metrics."""
        return {"running": self.engine.running, "waiting": self.engine.waiting, "kv": self.engine.kv_usage()}
