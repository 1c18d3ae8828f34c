"""Shared benchmark harness: timing, FLOP and byte counts, peak memory, parity, results file, table, plot.

Every suite (``fastpeft.bench.kernel``, ``.training``, ``.serving``, ``.ceilings``) measures through this
module so that all numbers mean the same thing:

- time: on CUDA, ``triton.testing.do_bench`` (it flushes the L2 cache between calls) or CUDA events when
  Triton is missing; on CPU, ``time.perf_counter``. Always after warm-up; reported as the median with the
  20th and 80th percentiles, in milliseconds.
- FLOPs of attention: ``4 * B * Hq * L * D * (P + S_visible)`` for the forward (two matmuls, 2 FLOPs per
  multiply-add) where ``S_visible`` is the average number of sequence keys a query sees (causal: about half);
  the backward is 2.5x the forward (five matmuls instead of two), as FlashAttention counts it.
- peak memory: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before the call.
  Not measured on CPU.
- parity: relative error ``||x - ref|| / ||ref||`` against the reference computed in the same run.

A run is one JSON document (see ``new_run``); each measurement is one record with the fields
``suite, case, shape, provider, metric, value, unit, quantiles`` (quantiles only for times).
"""

import datetime
import json
import math
import os
import platform
import re
import statistics
import time

import torch

from ..version import installed_version

SCHEMA = "fastpeft-bench/1"
QUANTILES = (0.5, 0.2, 0.8)
CPU_NOTE = "CPU smoke figures, not kernel claims"


# ----------------------------------------------------------------------------------------------------------
# timing


class Timing:
    """Median and 20th/80th percentile of repeated calls, in milliseconds."""

    def __init__(self, median_ms, p20_ms, p80_ms):
        self.median_ms, self.p20_ms, self.p80_ms = float(median_ms), float(p20_ms), float(p80_ms)

    def quantiles(self):
        return {"p20": self.p20_ms, "p50": self.median_ms, "p80": self.p80_ms}


def percentile(sorted_values, q):
    """Linear-interpolated percentile of an ascending list, q in [0, 1]."""
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _timing_from_samples(samples_ms):
    ordered = sorted(samples_ms)
    return Timing(statistics.median(ordered), percentile(ordered, 0.2), percentile(ordered, 0.8))


def time_cpu(fn, warmup=2, min_reps=5, max_reps=50, budget_s=1.0):
    """Time ``fn()`` on the CPU: ``warmup`` untimed calls, then at least ``min_reps`` timed calls and more
    while the time budget lasts (at most ``max_reps``)."""
    for _ in range(warmup):
        fn()
    samples, spent = [], 0.0
    while len(samples) < min_reps or (spent < budget_s and len(samples) < max_reps):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed * 1e3)
        spent += elapsed
    return _timing_from_samples(samples)


def time_cuda(fn, warmup_ms=25, rep_ms=100):
    """Time ``fn()`` on the current CUDA device: ``triton.testing.do_bench`` when Triton is importable
    (warm-up, L2 flush between calls), otherwise CUDA events around each call after the same warm-up."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(median, p20, p80)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    samples = []
    for _ in range(max(5, int(rep_ms / estimate_ms))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return _timing_from_samples(samples)


def time_fn(fn, device, quick=False):
    """Time ``fn()`` on ``device`` with the method that suits it; ``quick`` shortens the repetitions."""
    if device.type == "cuda":
        return time_cuda(fn, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100)
    return time_cpu(fn, warmup=1 if quick else 2, min_reps=3 if quick else 5, budget_s=0.2 if quick else 1.0)


def time_calls(fn, device, warmup=1, reps=5):
    """Time whole, stateful calls (a training step, a ``generate``) one by one: ``warmup`` untimed calls,
    then ``reps`` timed ones, synchronizing the device around each. For calls too long or too stateful for
    ``time_fn``'s many repetitions."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return _timing_from_samples(samples)


def time_interleaved(steps, device, setup=None, warmup=1, reps=5, lead_in=0):
    """Time whole, stateful calls of several providers taken in turn: every round calls, for each label of
    ``steps`` in order, ``setup(label)`` (untimed, where given), ``lead_in`` untimed ``steps[label]()`` and then one
    timed one; ``warmup`` untimed rounds first. Returns ``{label: Timing}``. A change of machine load during the run
    reaches every provider alike. ``lead_in=1`` times each call right after one of its own provider, as in a training
    run, where every step follows a step of the same model (and finds that model's data in the caches), rather than
    a step of another provider's model."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    samples = {label: [] for label in steps}
    for round_index in range(warmup + reps):
        for label, fn in steps.items():
            if setup is not None:
                setup(label)
            for _ in range(lead_in if round_index >= warmup else 0):
                fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_index >= warmup:
                samples[label].append((time.perf_counter() - start) * 1e3)
    return {label: _timing_from_samples(values) for label, values in samples.items()}


# ----------------------------------------------------------------------------------------------------------
# memory, FLOPs, bytes, parity


def peak_memory_bytes(fn, device):
    """Extra device memory at the peak of ``fn()`` (bytes above what was allocated before), or None on CPU.
    ``fn``'s return value is kept alive until the peak is read, so tensors it returns count."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def visible_keys(L, S, causal):
    """Average number of the ``S`` sequence keys a query sees, over the ``L`` queries (bottom-right aligned:
    query ``i`` sees keys ``0 .. S-L+i``)."""
    if not causal:
        return float(S)
    return (S - L) + (L + 1) / 2.0


def attention_flops(B, Hq, L, S, P, D, causal, mode):
    """FLOPs of attention over ``[prefix ; keys]``: forward ``4*B*Hq*L*D*(P + S_visible)``; backward 2.5x the
    forward; ``mode`` is ``fwd``, ``bwd`` or ``fwd+bwd``."""
    forward = 4.0 * B * Hq * L * D * (P + visible_keys(L, S, causal))
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


def decode_bytes(B, Hq, Hkv, S, D, prefix_entries, P, element_size):
    """Bytes one decode step (L = 1) must move at least: read q, the cache's k/v and each distinct prefix
    entry once, write the output."""
    q_and_out = 2 * B * Hq * D
    cache = 2 * B * Hkv * S * D
    prefix = 2 * prefix_entries * Hkv * P * D
    return (q_and_out + cache + prefix) * element_size


def relative_error(x, ref):
    """``||x - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    x, ref = x.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


# ----------------------------------------------------------------------------------------------------------
# environment and results


def device_info(device):
    """Name and properties of the device the run measures."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
                "cuda": torch.version.cuda}
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(info):
    """File-name-safe device name: ``nvidia-h100-80gb-hbm3``, or ``cpu``."""
    if info["type"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-") or "cuda"


def new_run(device, quick, suites):
    """The JSON document of one run, with an empty ``results`` list."""
    info = device_info(device)
    versions = {name: installed_version(name) for name in
                ("fastpeft", "torch", "triton", "transformers", "peft", "bitsandbytes")}
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info,
        "versions": versions,
        "host": platform.node(),
        "quick": bool(quick),
        "suites": list(suites),
        "note": CPU_NOTE if device.type == "cpu" else None,
        "notes": [],
        "results": [],
    }


class Recorder:
    """Collects the records of one run. ``add`` is the single way a measurement enters the results."""

    def __init__(self, run, log=print):
        self.run = run
        self.log = log

    def add(self, suite, case, shape, provider, metric, value, unit, quantiles=None, **extra):
        record = {"suite": suite, "case": case, "shape": dict(shape), "provider": provider, "metric": metric,
                  "value": None if value is None else float(value), "unit": unit, "quantiles": quantiles}
        record.update(extra)
        self.run["results"].append(record)
        return record

    def add_time(self, suite, case, shape, provider, timing, **extra):
        return self.add(suite, case, shape, provider, "time", timing.median_ms, "ms", timing.quantiles(), **extra)

    def note(self, message):
        """A remark that belongs with the numbers (a provider skipped and why, a caveat)."""
        self.run["notes"].append(message)
        self.log(f"  note: {message}")


def validate_run(run):
    """Raise ``ValueError`` unless ``run`` follows the schema (used by tests and before writing)."""
    for key, kind in (("schema", str), ("date", str), ("device", dict), ("versions", dict), ("quick", bool),
                      ("suites", list), ("notes", list), ("results", list)):
        if not isinstance(run.get(key), kind):
            raise ValueError(f"run[{key!r}] must be a {kind.__name__}")
    if run["schema"] != SCHEMA:
        raise ValueError(f"unknown schema {run['schema']!r}")
    for i, record in enumerate(run["results"]):
        for key, kind in (("suite", str), ("case", str), ("shape", dict), ("provider", str), ("metric", str),
                          ("unit", str)):
            if not isinstance(record.get(key), kind):
                raise ValueError(f"results[{i}][{key!r}] must be a {kind.__name__}")
        value = record.get("value")
        if value is not None and not (isinstance(value, float) and math.isfinite(value)):
            raise ValueError(f"results[{i}]['value'] must be a finite float or null, got {value!r}")
        quantiles = record.get("quantiles")
        if quantiles is not None:
            if set(quantiles) != {"p20", "p50", "p80"} or not quantiles["p20"] <= quantiles["p50"] <= quantiles["p80"]:
                raise ValueError(f"results[{i}]['quantiles'] must be ordered p20 <= p50 <= p80")


def results_path(run, out_dir, name=None):
    """``out_dir/<date>-<device>.json`` (``<name>-<date>-<device>.json`` for a benchmark with a file name of its
    own); a second run on the same day gets ``-2``, ``-3``, ... rather than overwriting the first."""
    stem = f"{name + '-' if name else ''}{run['date'][:10]}-{device_slug(run['device'])}"
    path = os.path.join(out_dir, f"{stem}.json")
    counter = 2
    while os.path.exists(path):
        path = os.path.join(out_dir, f"{stem}-{counter}.json")
        counter += 1
    return path


def write_run(run, out_dir, name=None):
    """Validate and write the run as JSON (named as ``results_path`` says); returns the path."""
    validate_run(run)
    os.makedirs(out_dir, exist_ok=True)
    path = results_path(run, out_dir, name)
    with open(path, "w") as f:
        json.dump(run, f, indent=2)
    return path


# ----------------------------------------------------------------------------------------------------------
# rendering


def _format(value, unit):
    if value is None:
        return "-"
    if unit == "rel":
        return f"{value:.1e}"
    if unit == "x":
        return f"{value:.2f}x"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or magnitude == 0:
        return f"{value:.3f}"
    return f"{value:.2e}"


def markdown_table(run, suite):
    """One markdown table for ``suite``: a row per (case, provider), a column per metric (with its unit)."""
    records = [r for r in run["results"] if r["suite"] == suite]
    if not records:
        return ""
    metrics = []
    for record in records:
        column = (record["metric"], record["unit"])
        if column not in metrics:
            metrics.append(column)
    rows = {}
    for record in records:
        rows.setdefault((record["case"], record["provider"]), {})[(record["metric"], record["unit"])] = record
    header = ["case", "provider"] + [f"{metric} ({unit})" for metric, unit in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (case, provider), cells in rows.items():
        values = []
        for column in metrics:
            record = cells.get(column)
            values.append("" if record is None else _format(record["value"], record["unit"]))
        lines.append("| " + " | ".join([case, provider] + values) + " |")
    return "\n".join(lines)


def render_markdown(run):
    """The whole run as markdown: a header with device and versions, then one table per suite, then notes."""
    device = run["device"]
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items() if v)
    out = [f"## fastpeft benchmarks, {run['date']}",
           f"device: {device['name']} ({device['type']}); {versions}"]
    if run.get("note"):
        out.append(f"**{run['note']}**")
    for suite in run["suites"]:
        table = markdown_table(run, suite)
        if table:
            out += ["", f"### {suite}", "", table]
    if run["notes"]:
        out += ["", "notes:"] + [f"- {note}" for note in run["notes"]]
    return "\n".join(out)


PLOTTED = {  # suite -> (metric, unit, axis label, log scale): the one metric each suite's panel shows
    # (the ceilings are no panel of their own: they go in the figure's title, as the context of the rest)
    "kernel": ("time", "ms", "time (ms), lower is better", True),
    "training": ("throughput", "tokens/s", "tokens/s, higher is better", False),
    "serving": ("throughput", "tokens/s", "generated tokens/s, higher is better", True),
    "serve_http": ("throughput", "tokens/s", "generated tokens/s over HTTP, higher is better", False),
}


def plot_run(run, path):
    """A PNG with one panel per suite: grouped bars, a group per case and a bar per provider. Returns the
    path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = []
    for suite in run["suites"]:
        metric, unit, label, log_scale = PLOTTED.get(suite, (None, None, None, False))
        records = [r for r in run["results"] if r["suite"] == suite and r["metric"] == metric
                   and (unit is None or r["unit"] == unit) and r["value"] is not None]
        if records:
            panels.append((suite, label, log_scale, records))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.2 * len(panels)), squeeze=False)
    for ax, (suite, label, log_scale, records) in zip(axes[:, 0], panels):
        cases = list(dict.fromkeys(r["case"] for r in records))
        providers = list(dict.fromkeys(r["provider"] for r in records))
        width = 0.8 / len(providers)
        for j, provider in enumerate(providers):
            xs, heights, errors = [], [], [[], []]
            for i, case in enumerate(cases):
                match = [r for r in records if r["case"] == case and r["provider"] == provider]
                if not match:
                    continue
                record = match[0]
                xs.append(i - 0.4 + width * (j + 0.5))
                heights.append(record["value"])
                q = record.get("quantiles")
                errors[0].append(record["value"] - q["p20"] if q else 0.0)
                errors[1].append(q["p80"] - record["value"] if q else 0.0)
            ax.bar(xs, heights, width, yerr=errors, label=provider, capsize=2)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        if log_scale:
            ax.set_yscale("log")
        title = f"{suite} - {run['device']['name']}"
        if run.get("note"):
            title += f" ({run['note']})"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    ceilings = [f"{_format(r['value'], r['unit'])} {r['unit']} {r['case']}" for r in run["results"]
                if r["suite"] == "ceilings" and r["metric"] == "achieved"]
    if ceilings:
        fig.suptitle("ceilings: " + "; ".join(ceilings), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
