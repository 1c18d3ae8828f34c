"""Load test of `fastpeft serve` on loopback: N tenants, M streamed requests from K concurrent clients (for each K
of --clients), greedy, against the same requests through PEFT with a KV cache one request at a time; every response
must equal PEFT's for its tenant alone.

    python benchmarks/bench_serve_http.py [--tenants 64] [--requests 256] [--clients 32,128] [--max-tokens 16]
                                          [--quick] [--out benchmarks/results]

For each client count a server runs in this process on 127.0.0.1 (ephemeral port) with the built-in model
(fastpeft.tiny), `--max-batch` = the client count and its default KV pool, and adapters of three kinds (prefix
tuning, prefix tuning with projection, prompt tuning) saved to a temporary folder and loaded like `fastpeft serve
--adapters DIR`. Clients are threads, each with one keep-alive HTTP/1.1 connection, sending streamed
/v1/completions (`return_token_ids`); a request's latency runs from sending it to its last token. Time to first token
(from the request's submission to the engine) and inter-token latency (between two tokens of one request) are what
the server measures for its /metrics histograms, each value recorded: as each token reaches the app. The client sees
no better, since the tiny byte-level model often picks bytes that are no complete UTF-8 text, which the server holds
back until their text is complete (as vLLM does) and which then arrive together. A warm-up pass of the same requests
runs first; the measured pass samples the engine's KV pool (`Engine.kv_usage`) every 5 ms: the bytes the requests'
blocks hold (peak and mean), against what the slot cache it replaced allocated and held for the whole run
(`max_batch x max_len` token positions).

Baseline: PEFT (`PeftModel.from_pretrained` per tenant), the tenant's requests one at a time, with a KV cache: PEFT's
forward on the prompt (use_cache=True), then the backbone on each new token with that cache (`_peft_cached_greedy`;
PEFT 0.21.2's own `generate` re-adds the prefix every step under transformers 5.24, so it is not used); its time to
first token runs from the request's tokenization to its first token picked, its inter-token latency between two
tokens picked. Oracle: every response is checked against PEFT's forward without a cache,
teacher-forced over prompt + response (the tokens `generate_without_cache` would pick). Memory: the server's RSS
after the warm-up and after the measured pass.

Results go through the shared harness (`fastpeft/bench/harness.py`): `serve-http-<date>-cpu.json` (schema
`fastpeft-bench/1`, suite `serve_http`), the markdown table beside it, and a throughput plot with matplotlib.
"""

import argparse
import concurrent.futures
import functools
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time

import torch

from fastpeft.bench import harness

SUITE = "serve_http"
MAX_LEN = 256
MIB = 1 << 20


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def make_adapters(folder, tenants, seed):
    """Save ``tenants`` adapters of mixed kinds for the built-in model; returns {name: path}."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from fastpeft import tiny

    kinds = [PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
             PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                encoder_hidden_size=64),
             PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)]
    paths = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = [get_peft_model(tiny.build_model(), config) for config in kinds]
        for i in range(tenants):
            model = models[i % len(kinds)]
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if parameter.requires_grad:
                        parameter.normal_(0, 1 if "embedding" in name else 0.05)
            path = os.path.join(folder, f"tenant-{i:03d}")
            model.save_pretrained(path)
            paths[f"tenant-{i:03d}"] = path
    return paths


def make_requests(tenants, count, seed):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "serve", "prefix", "token", "batch", "tenant", "cache"]
    return [(f"tenant-{rng.randrange(tenants):03d}", " ".join(rng.choice(words) for _ in range(rng.randint(1, 5))))
            for _ in range(count)]


def stream_completion(connection, body):
    """One streamed /v1/completions on ``connection``: ``(latency from sending it to its last token, token ids)``."""
    sent_at = time.perf_counter()
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    tokens, last_at = [], None
    for line in iter(response.readline, b""):
        if not line.startswith(b"data: "):
            continue
        payload = line[len(b"data: "):].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        ids = chunk["choices"][0].get("token_ids") or []
        if ids:
            tokens += ids
            last_at = time.perf_counter()
    response.read()   # the end of the chunked body, so that the connection serves the next request
    return (last_at or time.perf_counter()) - sent_at, tokens


class Recorded:
    """One of the app's latency histograms with every value it observes also kept in ``values``."""

    def __init__(self, histogram):
        self.histogram, self.values = histogram, []

    def observe(self, value):
        self.values.append(value)
        self.histogram.observe(value)


class KVSampler:
    """Samples ``engine.kv_usage()`` every ``interval_s`` on a thread of its own, while running (``with``)."""

    def __init__(self, engine, interval_s=0.005):
        self.engine, self.interval_s, self.samples = engine, interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.engine.kv_usage().bytes_in_use)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()


def run_server(paths, requests, clients, max_tokens):
    """Serve ``requests`` from ``clients`` streaming clients (a warm-up pass, then the measured one). Returns the
    measured pass's wall time, per request ``(latency, token ids)``, its times to first token and inter-token
    latencies, the KV samples, RSS before and after, the engine's counters and its pool's and bank's sizes."""
    from fastpeft import tiny
    from fastpeft.serve import build_server

    server = build_server(tiny.build_model(), tiny.build_tokenizer(), paths, base_name="fastpeft-tiny",
                          max_batch=clients, max_len=MAX_LEN, max_queue=len(requests), max_tokens_limit=max_tokens,
                          default_temperature=0.0).start()
    metrics = server.app.state.metrics
    metrics.time_to_first_token = first_tokens = Recorded(metrics.time_to_first_token)
    metrics.inter_token_latency = between_tokens = Recorded(metrics.inter_token_latency)
    local = threading.local()

    def one(job):
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(*server.address, timeout=600)
        name, prompt = job
        return stream_completion(local.connection, {"model": name, "prompt": prompt, "max_tokens": max_tokens,
                                                    "return_token_ids": True})

    engine = server.engine
    try:
        # Warm-up: the same requests once, so that the measured pass starts with every lazily grown buffer (adapter
        # tables, allocator pools) in place; memory is flat when RSS after the measured pass equals RSS before it.
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, requests))
        rss_before = rss_bytes()
        first_tokens.values.clear()
        between_tokens.values.clear()
        with KVSampler(engine) as kv, concurrent.futures.ThreadPoolExecutor(clients) as pool:
            start = time.perf_counter()
            results = list(pool.map(one, requests))
            wall = time.perf_counter() - start
        rss_after = rss_bytes()
        sizes = {"pool_bytes": engine.pool.nbytes,
                 "bytes_per_token": engine.pool.bytes_per_block // engine.pool.block_size,
                 "prefix_table_bytes": engine.bank.storage_bytes}
        stats = dict(engine.stats)
    finally:
        server.close()
    return wall, results, first_tokens.values, between_tokens.values, kv.samples, rss_before, rss_after, stats, sizes


def _peft_cached_greedy(model, ids, max_tokens):
    """PEFT serving one request with a KV cache: PEFT's own forward for the prompt (its prefix or virtual tokens
    included, ``use_cache=True``), then the backbone on each new token with the cache that forward returned (which
    holds the prefix / virtual tokens), positions continuing after them, as PEFT's ``generate`` intends. Greedy, ends
    at eos. Returns the tokens and the time each was picked. (PEFT 0.21.2's own ``generate`` re-adds the prefix at
    every step under transformers 5.24.)"""
    from fastpeft import tiny
    from fastpeft.integration import compat

    base = model.get_base_model()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache, new, picked_at = compat.cache_of(out), [], []
    for _ in range(max_tokens):
        token = int(out.logits[0, -1].argmax())
        if token == tiny.EOS_ID:
            break
        new.append(token)
        picked_at.append(time.perf_counter())
        if len(new) == max_tokens:
            break
        length = compat.cache_length(cache)
        out = base(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                   position_ids=torch.tensor([[length]]), use_cache=True, **compat.cache_kwargs(base, cache))
        cache = compat.cache_of(out)
    return new, picked_at


def run_peft(paths, requests, max_tokens):
    """The same requests by PEFT with a KV cache (``_peft_cached_greedy``), one tenant at a time, one request at a
    time: the fair baseline of a server that loads a tenant's PeftModel and serves its requests. Returns the wall
    time, per request ``(latency, tokens)`` as ``run_server``, and the times to first token and inter-token latencies
    (from the request's tokenization)."""
    from peft import PeftModel

    from fastpeft import tiny

    tokenizer = tiny.build_tokenizer()
    base = tiny.build_model()
    results, first_tokens, between_tokens = [None] * len(requests), [], []
    start = time.perf_counter()
    for name in sorted({name for name, _ in requests}):
        model = PeftModel.from_pretrained(base, paths[name]).eval()
        for i, (adapter, prompt) in enumerate(requests):
            if adapter != name:
                continue
            begin = time.perf_counter()
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            tokens, picked_at = _peft_cached_greedy(model, ids, max_tokens)
            results[i] = (time.perf_counter() - begin, tokens)
            if picked_at:
                first_tokens.append(picked_at[0] - begin)
                between_tokens += [later - earlier for earlier, later in zip(picked_at, picked_at[1:])]
        base = model.get_base_model()
    return time.perf_counter() - start, results, first_tokens, between_tokens


def oracle_mismatches(paths, requests, responses, max_tokens):
    """Requests whose response is not PEFT's greedy continuation: PEFT's forward without a cache over prompt +
    response (one call per request, teacher-forced) must pick every response token, and eos next unless the response
    has max_tokens tokens. That is ``generate_without_cache``'s answer, checked in one forward instead of one per
    token."""
    from peft import PeftModel

    from fastpeft import tiny

    tokenizer = tiny.build_tokenizer()
    base = tiny.build_model()
    mismatches = []
    for name in sorted({name for name, _ in requests}):
        model = PeftModel.from_pretrained(base, paths[name]).eval()
        for i, (adapter, prompt) in enumerate(requests):
            if adapter != name:
                continue
            prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            response = responses[i]
            ids = torch.cat([prompt_ids, torch.tensor([response], dtype=torch.long)], 1)
            picks = model(input_ids=ids).logits[0, -len(response) - 1:].argmax(-1).tolist()
            expected_next = picks[-1] if len(response) == max_tokens else tiny.EOS_ID
            if picks[:-1] != response or picks[-1] != expected_next:
                mismatches.append(i)
        base = model.get_base_model()
    return mismatches


def record_latencies(recorder, case, shape, provider, wall, results, first_tokens, between_tokens):
    """Throughput, time to first token, inter-token latency and request latency (p50, p99) of one provider."""
    tokens = sum(len(result[1]) for result in results)
    recorder.add(SUITE, case, shape, provider, "throughput", tokens / wall, "tokens/s")
    series = {"ttft": sorted(first_tokens), "itl": sorted(between_tokens),
              "latency": sorted(result[0] for result in results)}
    for name, values in series.items():
        for q in (50, 99):
            value = harness.percentile(values, q / 100) * 1e3 if values else None
            recorder.add(SUITE, case, shape, provider, f"{name}_p{q}", value, "ms")
    return tokens / wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", default="32,128", help="comma-separated client counts (32,128)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 tenants, 8 requests, 2 and 4 clients, 8 tokens")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.tenants, args.requests, args.clients, args.max_tokens = 4, 8, "2,4", 8
    client_counts = [int(count) for count in args.clients.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_grad_enabled(False)

    run = harness.new_run(torch.device("cpu"), args.quick, [SUITE])
    recorder = harness.Recorder(run)
    shape = {"tenants": args.tenants, "requests": args.requests, "max_tokens": args.max_tokens, "max_len": MAX_LEN}
    run["engine_stats"] = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = make_adapters(folder, args.tenants, args.seed)
        requests = make_requests(args.tenants, args.requests, args.seed)
        served = {clients: run_server(paths, requests, clients, args.max_tokens) for clients in client_counts}
        peft_wall, peft_results, peft_first, peft_between = run_peft(paths, requests, args.max_tokens)
        mismatches = {clients: oracle_mismatches(paths, requests, [result[1] for result in served[clients][1]],
                                                 args.max_tokens) for clients in client_counts}

    peft_case = "one request at a time"
    peft_rate = record_latencies(recorder, peft_case, shape, "PEFT + KV cache", peft_wall, peft_results,
                                 peft_first, peft_between)
    for clients in client_counts:
        wall, results, first_tokens, between_tokens, kv_samples, rss_before, rss_after, stats, sizes = served[clients]
        case, provider, case_shape = f"{clients} clients", "fastpeft serve", {**shape, "clients": clients}
        rate = record_latencies(recorder, case, case_shape, provider, wall, results, first_tokens, between_tokens)
        add = functools.partial(recorder.add, SUITE, case, case_shape, provider)   # add(metric, value, unit)
        add("speedup_vs_peft", rate / peft_rate, "x")
        add("kv_held_peak", max(kv_samples, default=0) / MIB, "MiB")
        add("kv_held_mean", sum(kv_samples) / len(kv_samples) / MIB if kv_samples else 0.0, "MiB")
        add("slot_cache", clients * MAX_LEN * sizes["bytes_per_token"] / MIB, "MiB")
        add("kv_pool", sizes["pool_bytes"] / MIB, "MiB")
        add("prefix_tables", sizes["prefix_table_bytes"] / MIB, "MiB")
        add("rss_before", rss_before / MIB if rss_before else None, "MiB")
        add("rss_after", rss_after / MIB if rss_after else None, "MiB")
        add("equal_to_peft_forward", len(requests) - len(mismatches[clients]), "requests")
        add("equal_to_peft_cached", sum(result[1] == expected[1] for result, expected in zip(results, peft_results)),
            "requests")
        run["engine_stats"][str(clients)] = stats
        if mismatches[clients]:
            recorder.note(f"{clients} clients: responses differing from PEFT's forward: {mismatches[clients]}")
    recorder.note("slot_cache: the KV cache the engine had before the pool, max_batch (= clients) x max_len token "
                  "positions allocated and held for the whole run; kv_held: the bytes of the pool's blocks in use, "
                  "sampled every 5 ms during the measured pass; kv_pool: the pool allocated (its default size, "
                  "max_batch x max_len tokens)")

    markdown = harness.render_markdown(run)
    print(markdown)
    path = harness.write_run(run, args.out, name="serve-http")
    stem = os.path.splitext(path)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown.rstrip("\n") + "\n")
    harness.plot_run(run, stem + ".png")
    print(f"wrote {path}")
    return 0 if not any(mismatches.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
