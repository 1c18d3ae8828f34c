"""Running ``fastpeft serve``'s app (``app.py``) with uvicorn: HTTP/1.1 with keep-alive, on a socket bound when the
``Server`` is made (so its port, 0 = any free one, is known before it serves), either in a background thread
(``start``: tests, benchmarks) or in the calling thread (``serve_forever``: the CLI).

Graceful drain. The first SIGTERM or SIGINT in ``serve_forever`` (or ``drain()`` from any thread) starts it: every
new request is answered 503 in OpenAI's error shape while the requests in flight finish; once none is left, or
``drain_timeout`` seconds have passed (the engine then ends the rest with 503 / an error event), uvicorn closes the
listening socket and the idle connections and the server stops. A second signal stops at once (uvicorn's own
shutdown).
"""

import asyncio
import socket
import threading
import time

import uvicorn

# After the drain, how long uvicorn waits for connections still open before cancelling their tasks.
SHUTDOWN_GRACE_S = 5
START_TIMEOUT_S = 60


class _DrainingUvicorn(uvicorn.Server):
    """uvicorn whose first exit signal drains (``DrainState``) instead of stopping."""

    def __init__(self, config, drain, client, drain_timeout):
        super().__init__(config)
        self.drain, self.client, self.drain_timeout = drain, client, drain_timeout
        self.drain_requested = False
        self.drain_deadline = None
        self.ready = threading.Event()

    async def startup(self, sockets=None):
        await super().startup(sockets)
        self.ready.set()

    def handle_exit(self, sig, frame):
        if self.drain_requested:
            super().handle_exit(sig, frame)
        else:
            self.drain_requested = True  # a plain store: on_tick acts on it, on the event loop

    async def on_tick(self, counter):
        if self.drain_requested and self.drain_deadline is None:
            self.drain.begin()
            self.drain_deadline = time.monotonic() + self.drain_timeout
        if self.drain_deadline is not None and not self.should_exit:
            if self.drain.idle:
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline:
                # Out of time: the engine ends what is left (503, or an error event on a stream), so that those
                # requests answer and their connections close before uvicorn's shutdown waits for them.
                self.client.stopping = True
                await asyncio.to_thread(self.client.engine.stop)
                self.should_exit = True
        return await super().on_tick(counter)


class Server:
    """The app on ``host:port``, served by uvicorn. ``close()`` stops the server and the engine."""

    def __init__(self, app, client, host="127.0.0.1", port=0, log_requests=False, drain_timeout=30.0):
        self.app, self.client = app, client
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=2048)
        config = uvicorn.Config(app, lifespan="off", log_level="info" if log_requests else "warning",
                                access_log=log_requests, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        self._uvicorn = _DrainingUvicorn(config, app.state.drain, client, drain_timeout)
        self._thread = None

    @property
    def engine(self):
        return self.client.engine

    @property
    def address(self):
        """``(host, port)`` the server listens on."""
        return self.socket.getsockname()[:2]

    @property
    def url(self):
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self):
        """Serve in a background thread; returns self once the server accepts connections."""
        self._thread = threading.Thread(target=self._serve, name="fastpeft-http", daemon=True)
        self._thread.start()
        if not self._uvicorn.ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the HTTP server did not start within {START_TIMEOUT_S} s")
        return self

    def serve_forever(self):
        """Serve in this thread until stopped (SIGTERM/SIGINT here drain first, see the module docstring)."""
        self._serve()

    def _serve(self):
        asyncio.run(self._uvicorn.serve(sockets=[self.socket]))

    def drain(self):
        """Start the graceful drain, as the first SIGTERM does (from any thread)."""
        self._uvicorn.drain_requested = True

    def wait(self, timeout=None):
        """Wait for the background server to stop (after ``drain()``); whether it did."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def close(self):
        """Stop at once: the engine ends the requests in flight (503, or an error event on a stream), then the
        server stops."""
        self.client.stopping = True
        self.client.engine.stop()
        self._uvicorn.should_exit = True
        self.wait()
        self.socket.close()
