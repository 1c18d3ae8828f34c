"""``/metrics`` of ``fastpeft serve`` in Prometheus' text format (prometheus-client), one registry per app (so two
servers in one process, as in the tests, keep their counts apart).

Counted by the app: generation requests by adapter and HTTP status, prompt and completion tokens by adapter,
time to first token and the time between two tokens. Read from the engine at each scrape (``gauges``; absent where
the app does not run the engine itself, as in a Ray ingress): requests waiting, requests running, and the KV storage
running requests hold (``Engine.kv_usage``: blocks and bytes).
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Seconds; decode steps of a small model on a CPU take milliseconds, a large one behind a long queue seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineGauges:
    """A collector that asks ``gauges()`` (``{"running", "waiting", "kv"}`` or None) at scrape time."""

    def __init__(self, gauges):
        self.gauges = gauges

    def describe(self):
        return []  # not known before the first scrape; keeps the registry from calling collect() at registration

    def collect(self):
        values = self.gauges()
        if values is None:
            return
        yield GaugeMetricFamily("fastpeft_requests_waiting", "requests queued for a place in the running batch",
                                value=values["waiting"])
        yield GaugeMetricFamily("fastpeft_requests_running", "requests in the running batch", value=values["running"])
        kv = values["kv"]
        yield GaugeMetricFamily("fastpeft_kv_blocks_in_use", "KV cache blocks held by running requests",
                                value=kv.blocks_in_use)
        yield GaugeMetricFamily("fastpeft_kv_blocks_total", "KV cache blocks", value=kv.blocks_total)
        yield GaugeMetricFamily("fastpeft_kv_block_tokens", "token positions per KV cache block",
                                value=kv.block_tokens)
        yield GaugeMetricFamily("fastpeft_kv_bytes_in_use", "bytes of the KV cache held by running requests",
                                value=kv.bytes_in_use)
        yield GaugeMetricFamily("fastpeft_kv_bytes_total", "bytes of the KV cache", value=kv.bytes_total)


class ServeMetrics:
    """The app's metrics. ``gauges``: a callable giving the engine's gauges, or None."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, gauges=None):
        self.registry = CollectorRegistry()
        self.requests = Counter("fastpeft_requests", "generation requests answered, by adapter and HTTP status "
                                "(adapter: the request's model, '' when it names no served one)",
                                ["adapter", "status"], registry=self.registry)
        self.prompt_tokens = Counter("fastpeft_prompt_tokens", "prompt tokens of admitted requests", ["adapter"],
                                     registry=self.registry)
        self.completion_tokens = Counter("fastpeft_completion_tokens", "tokens generated", ["adapter"],
                                         registry=self.registry)
        self.time_to_first_token = Histogram("fastpeft_time_to_first_token_seconds",
                                             "from submission to the engine to the first generated token",
                                             buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("fastpeft_inter_token_latency_seconds",
                                             "between two consecutive tokens of a request",
                                             buckets=ITL_BUCKETS, registry=self.registry)
        if gauges is not None:
            self.registry.register(_EngineGauges(gauges))

    def render(self):
        return generate_latest(self.registry)
