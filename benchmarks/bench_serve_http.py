"""Load test of `fastpeft serve` on loopback: N tenants, M requests from K concurrent clients, greedy, against the
same requests through PEFT one tenant at a time; every response must equal PEFT's for its tenant alone.

    python benchmarks/bench_serve_http.py [--tenants 64] [--requests 256] [--clients 32] [--max-tokens 16]
                                          [--quick] [--out benchmarks/results]

The server runs in this process on 127.0.0.1 (ephemeral port) with the built-in model (fastpeft.tiny) and
adapters of three kinds (prefix tuning, prefix tuning with projection, prompt tuning) saved to a temporary folder
and loaded like `fastpeft serve --adapters DIR`. Clients are threads sending non-streamed /v1/completions.

Baseline: PEFT (`PeftModel.from_pretrained` per tenant), the tenant's requests one at a time, with a KV cache: PEFT's
forward on the prompt (use_cache=True), then the backbone on each new token with that cache (`_peft_cached_greedy`;
PEFT 0.21.2's own `generate` re-adds the prefix every step under transformers 5.24, so it is not used). Oracle: every
response is checked against PEFT's forward without a cache, teacher-forced over prompt + response (the tokens
`generate_without_cache` would pick). Memory: the server's RSS after a warm-up run of the same requests and after the
measured run. Writes JSON (and a latency plot when matplotlib is installed) to --out.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
import urllib.request

import torch


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


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_server(paths, requests, clients, max_tokens):
    from fastpeft import tiny
    from fastpeft.serve import build_server

    server = build_server(tiny.build_model(), tiny.build_tokenizer(), paths, base_name="fastpeft-tiny",
                          max_batch=clients, max_len=256, max_queue=len(requests), max_tokens_limit=max_tokens,
                          default_temperature=0.0).start()

    def one(job):
        name, prompt = job
        body = json.dumps({"model": name, "prompt": prompt, "max_tokens": max_tokens,
                           "return_token_ids": True}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            payload = json.load(response)
        return time.perf_counter() - start, payload["choices"][0]["token_ids"]

    try:
        # Warm-up: the same requests once, so that the measured run starts with every lazily grown buffer (adapter
        # tables, allocator pools) in place; memory is flat when RSS after the measured run equals RSS before it.
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, requests))
        rss_before = rss_bytes()
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, requests))
        wall = time.perf_counter() - start
        rss_after = rss_bytes()
        stats = dict(server.engine.stats)
    finally:
        server.close()
    return wall, results, rss_before, rss_after, stats


def _peft_cached_greedy(model, ids, max_tokens):
    """PEFT serving one request with a KV cache: PEFT's own forward for the prompt (its prefix or virtual tokens
    included, ``use_cache=True``), then the backbone on each new token with the cache that forward returned (which
    holds the prefix / virtual tokens), positions continuing after them, as PEFT's ``generate`` intends. Greedy, ends
    at eos. (PEFT 0.21.2's own ``generate`` re-adds the prefix at every step under transformers 5.24.)"""
    from fastpeft import tiny
    from fastpeft.integration import compat

    base = model.get_base_model()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache, new = compat.cache_of(out), []
    for _ in range(max_tokens):
        token = int(out.logits[0, -1].argmax())
        if token == tiny.EOS_ID:
            break
        new.append(token)
        if len(new) == max_tokens:
            break
        length = compat.cache_length(cache)
        out = base(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                   position_ids=torch.tensor([[length]]), use_cache=True, **compat.cache_kwargs(base, cache))
        cache = compat.cache_of(out)
    return new


def run_peft(paths, requests, max_tokens):
    """The same requests by PEFT with a KV cache (``_peft_cached_greedy``), one tenant at a time, one request at a
    time: the fair baseline of a server that loads a tenant's PeftModel and serves its requests."""
    from peft import PeftModel

    from fastpeft import tiny

    tokenizer = tiny.build_tokenizer()
    base = tiny.build_model()
    outputs, latencies = [None] * len(requests), [None] * len(requests)
    start = time.perf_counter()
    for name in sorted({name for name, _ in requests}):
        model = PeftModel.from_pretrained(base, paths[name]).eval()
        for i, (adapter, prompt) in enumerate(requests):
            if adapter != name:
                continue
            begin = time.perf_counter()
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            outputs[i] = _peft_cached_greedy(model, ids, max_tokens)
            latencies[i] = time.perf_counter() - begin
        base = model.get_base_model()
    return time.perf_counter() - start, outputs, latencies


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 tenants, 8 requests, 4 clients, 8 tokens")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.tenants, args.requests, args.clients, args.max_tokens = 4, 8, 4, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as folder:
        paths = make_adapters(folder, args.tenants, args.seed)
        requests = make_requests(args.tenants, args.requests, args.seed)
        wall, results, rss_before, rss_after, stats = run_server(paths, requests, args.clients, args.max_tokens)
        peft_wall, peft_outputs, peft_latencies = run_peft(paths, requests, args.max_tokens)
        mismatches = oracle_mismatches(paths, requests, [ids for _, ids in results], args.max_tokens)

    latencies = [latency for latency, _ in results]
    peft_disagrees = [i for i, ((_, ids), expected) in enumerate(zip(results, peft_outputs)) if ids != expected]
    tokens = sum(len(ids) for _, ids in results)
    peft_tokens = sum(len(ids) for ids in peft_outputs)
    record = {
        "benchmark": "serve_http", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
        "torch": torch.__version__, "model": "fastpeft.tiny (built-in)",
        "tenants": args.tenants, "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "completion_tokens": tokens,
        "serve": {"wall_s": wall, "tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 50),
                  "p99_s": percentile(latencies, 99), "failed": 0, "engine": stats,
                  "rss_before_bytes": rss_before, "rss_after_bytes": rss_after},
        "peft_cached_one_tenant_at_a_time": {"wall_s": peft_wall, "tokens_per_s": peft_tokens / peft_wall,
                                             "completion_tokens": peft_tokens,
                                             "p50_s": percentile(peft_latencies, 50),
                                             "p99_s": percentile(peft_latencies, 99),
                                             "responses_equal_to_serve": len(requests) - len(peft_disagrees)},
        "speedup_tokens_per_s": (tokens / wall) / (peft_tokens / peft_wall),
        "responses_equal_to_peft_forward": len(requests) - len(mismatches), "mismatched_requests": mismatches,
    }
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = os.path.join(args.out, f"serve-http-cpu-{stamp}{'-quick' if args.quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.hist([latencies, peft_latencies], bins=30, label=["fastpeft serve (K concurrent)", "PEFT, one at a time"])
        axis.set_xlabel("request latency (s)")
        axis.set_ylabel("requests")
        axis.legend()
        figure.tight_layout()
        figure.savefig(stem + ".png", dpi=120)
    except ImportError:
        pass
    print(json.dumps({k: record[k] for k in ("serve", "peft_cached_one_tenant_at_a_time", "speedup_tokens_per_s",
                                             "responses_equal_to_peft_forward")}, indent=2))
    print(f"wrote {stem}.json")
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
