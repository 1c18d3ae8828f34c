"""Serving suite: generation throughput with many soft-prompt tenants in one batch, and the decode kernel's
achieved memory bandwidth.

End to end (GPU: the Llama-style 1.1B model in bfloat16; CPU: the built-in small model, a smoke run):
a batch of requests (64 rows on GPU) of equal prompt length, each row with one of ``T`` distinct
prefix-tuning adapters (``T`` = 1, 8, 64; rows assigned round-robin), greedy, a fixed number of new tokens.

- ``fastpeft-bank``: every row in one ``fastpeft.AdapterBank.generate`` call. ``T = 1`` is the one shared
  tenant baseline (a): ``vs_shared`` is the throughput at ``T`` tenants divided by that at ``T = 1``.
- ``peft-grouped``: baseline (b), PEFT serving the same requests grouped by adapter: one ``generate`` per
  adapter over its rows (PEFT has one active prompt-learning adapter at a time).

Throughput counts generated tokens only (prefill included in the time). Parity: the fraction of rows whose
greedy tokens from the bank equal PEFT's (bfloat16 may legitimately flip near-ties).

Encoder-decoder (a random T5: t5-base's shape on GPU, a small one on CPU): 8 tenants, one row each, their adapters
mixed (prefix tuning, prompt tuning, p-tuning; 8..15 virtual tokens), greedy. ``fastpeft-bank``: the 8 rows in one
``AdapterBank.generate`` call (the encoder once, each row with its own virtual tokens; the decoder reading each row's
prefix); ``peft-per-tenant``: PEFT generating one tenant's row at a time (its own ``generate``, the adapter set per
call). ``speedup`` is their time ratio, from the same run.

Decode kernel (``prefix_attention`` with L = 1, no grad, a prefix table read through ``prefix_index``):
achieved bandwidth = the bytes a decode step must move (``harness.decode_bytes``: q, the KV cache, each distinct
prefix entry once, the output) / time, and its fraction of the measured device-copy bandwidth. ``peft-concat``
(gather the rows' prefixes, concatenate with the cache, SDPA) is timed on the same step for comparison.
"""

import copy
import os
import tempfile

import torch
import torch.nn.functional as F

from . import harness
from .kernel import repeat_kv
from .models import build_causal_lm, build_seq2seq_lm, random_batch

SUITE = "serving"


def settings(device, quick):
    if device.type == "cuda":
        return dict(rows=64, prompt=128, new=8 if quick else 32, P=32, tenants=(1, 8) if quick else (1, 8, 64),
                    dtype="bfloat16", reps=1 if quick else 3)
    # a CPU generate takes ~30 ms: enough repetitions that a median is not one noisy sample
    return dict(rows=8, prompt=16, new=4 if quick else 8, P=8, tenants=(1, 4) if quick else (1, 2, 8),
                dtype="float32", reps=1 if quick else 7)


def decode_shapes(device, quick):
    """Decode-kernel shapes: a 7B-class attention layer with a 2048-token cache on GPU, small on CPU."""
    if device.type == "cuda":
        base = dict(B=64, Hq=32, Hkv=8, S=2048, P=64, D=128, dtype="bfloat16")
        return [dict(base, T=64)] if quick else [dict(base, T=1), dict(base, T=64)]
    return [dict(B=8, Hq=8, Hkv=2, S=128, P=16, D=64, T=8, dtype="float32")]


def _make_adapters(base, count, P, directory):
    """Save ``count`` prefix-tuning adapters of ``base`` (random prefixes, seeds 0..count-1) under
    ``directory``; returns {name: path}."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    peft_model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    paths = {}
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            embedding.copy_(torch.randn(embedding.shape, generator=g))
        paths[f"tenant-{i}"] = os.path.join(directory, f"tenant-{i}")
        peft_model.save_pretrained(paths[f"tenant-{i}"])
    return paths


# Rows whose bank tokens are checked against PEFT's forward looped without a cache (slow: one full forward per
# token): PEFT's own generate is no reference since transformers 5.24 (it no longer equals PEFT's forward).
CHECKED_ROWS = 4


def _peft_grouped(base, paths, names_per_row, input_ids, attention_mask, new_tokens):
    """PEFT generating each adapter's rows in its own call. Returns ``(generate, reference)``: a callable producing
    ``[B, new]`` tokens (timed), and one producing the first ``CHECKED_ROWS`` rows' tokens by PEFT's forward
    without a cache (the parity reference)."""
    from ..integration.reference_generate import generate_without_cache

    from peft import PeftModel

    used = list(dict.fromkeys(names_per_row))
    peft_model = PeftModel.from_pretrained(base, paths[used[0]], adapter_name=used[0])
    for name in used[1:]:
        peft_model.load_adapter(paths[name], adapter_name=name)
    peft_model.eval()
    groups = {name: [i for i, n in enumerate(names_per_row) if n == name] for name in used}

    def generate():
        out = torch.empty(len(names_per_row), new_tokens, dtype=torch.long, device=input_ids.device)
        with torch.inference_mode():
            for name, rows in groups.items():
                peft_model.set_adapter(name)
                index = torch.tensor(rows, device=input_ids.device)
                generated = peft_model.generate(input_ids=input_ids[index], attention_mask=attention_mask[index],
                                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False)
                out[index] = generated[:, -new_tokens:]
        return out

    def reference():
        rows = []
        for row in range(min(CHECKED_ROWS, len(names_per_row))):
            peft_model.set_adapter(names_per_row[row])
            tokens, _ = generate_without_cache(peft_model, input_ids[row:row + 1], attention_mask[row:row + 1],
                                               max_new_tokens=new_tokens)
            rows.append(tokens[0, -new_tokens:])
        return torch.stack(rows)
    return generate, reference


def _end_to_end(recorder, device, quick):
    cfg = settings(device, quick)
    dtype = getattr(torch, cfg["dtype"])
    base, description = build_causal_lm(device, dtype)
    recorder.log(f"[serving] {description}; {cfg['rows']} rows x {cfg['prompt']} prompt tokens, "
                 f"{cfg['new']} new, P={cfg['P']}, tenants {cfg['tenants']}")
    input_ids, attention_mask = random_batch(base.config.vocab_size, cfg["rows"], cfg["prompt"], device, seed=1)
    generated_tokens = cfg["rows"] * cfg["new"]
    try:
        import fastpeft
        bank_class = fastpeft.AdapterBank
    except (ImportError, AttributeError) as exc:
        bank_class = None
        recorder.note(f"fastpeft-bank skipped: fastpeft.AdapterBank is unavailable ({exc})")

    with tempfile.TemporaryDirectory(prefix="fastpeft-bench-") as directory:
        paths = _make_adapters(copy.deepcopy(base), max(cfg["tenants"]), cfg["P"], directory)
        bank = None
        if bank_class is not None:
            bank = bank_class(copy.deepcopy(base))
            for name, path in paths.items():
                bank.add(name, path)
        shared_throughput = None
        for tenants in cfg["tenants"]:
            names = [f"tenant-{row % tenants}" for row in range(cfg["rows"])]
            case = f"{tenants} tenant{'s' if tenants > 1 else ''} / {cfg['rows']} rows"
            shape = {"model": description, "rows": cfg["rows"], "prompt_tokens": cfg["prompt"],
                     "new_tokens": cfg["new"], "P": cfg["P"], "tenants": tenants, "dtype": cfg["dtype"]}

            peft_generate, peft_reference = _peft_grouped(copy.deepcopy(base), paths, names, input_ids, attention_mask, cfg["new"])
            peft_timing = harness.time_calls(peft_generate, device, warmup=1, reps=cfg["reps"])
            recorder.add_time(SUITE, case, shape, "peft-grouped", peft_timing)
            recorder.add(SUITE, case, shape, "peft-grouped", "throughput",
                         generated_tokens / (peft_timing.median_ms * 1e-3), "tokens/s")
            if bank is None:
                continue

            def bank_generate():
                return bank.generate(input_ids, attention_mask=attention_mask, adapters=names, eos_token_id=[],
                                     max_new_tokens=cfg["new"], do_sample=False)[:, -cfg["new"]:]
            try:
                timing = harness.time_calls(bank_generate, device, warmup=1, reps=cfg["reps"])
            except Exception as exc:  # report, keep PEFT's numbers
                recorder.note(f"fastpeft-bank on {case}: {exc.__class__.__name__}: {str(exc).strip()[:300]}")
                continue
            throughput = generated_tokens / (timing.median_ms * 1e-3)
            recorder.add_time(SUITE, case, shape, "fastpeft-bank", timing)
            recorder.add(SUITE, case, shape, "fastpeft-bank", "throughput", throughput, "tokens/s")
            recorder.add(SUITE, case, shape, "fastpeft-bank", "speedup", peft_timing.median_ms / timing.median_ms,
                         "x")
            if tenants == 1:
                shared_throughput = throughput
            if shared_throughput is not None:
                recorder.add(SUITE, case, shape, "fastpeft-bank", "vs_shared", throughput / shared_throughput, "x")
            expected = peft_reference()
            agreement = (bank_generate()[:len(expected)] == expected).all(dim=1).float().mean()
            recorder.add(SUITE, case, shape, "fastpeft-bank", "token_agreement", agreement, "fraction",
                         reference=f"PEFT's forward looped without a cache, greedy, first {len(expected)} rows")
        if bank is not None:
            bank.close()


def seq2seq_settings(device, quick):
    if device.type == "cuda":
        return dict(tenants=8, prompt=128, new=8 if quick else 32, P=8, dtype="bfloat16", reps=1 if quick else 3)
    return dict(tenants=8, prompt=16, new=4 if quick else 8, P=8, dtype="float32", reps=1 if quick else 5)


# The encoder-decoder tenants' adapter kinds, in turn.
_SEQ2SEQ_KINDS = ("prefix", "prompt", "p-tuning")


def _make_seq2seq_adapters(base, count, P, directory):
    """Save ``count`` SEQ_2_SEQ_LM adapters of ``base`` under ``directory``, the kinds in turn, tenant i with
    ``P + i`` virtual tokens and prompt parameters drawn from seed i; returns {name: path}."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    configs = {"prefix": lambda n: PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n),
               "prompt": lambda n: PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n),
               "p-tuning": lambda n: PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n,
                                                         encoder_hidden_size=128)}
    paths = {}
    for i in range(count):
        peft_model = get_peft_model(copy.deepcopy(base), configs[_SEQ2SEQ_KINDS[i % len(_SEQ2SEQ_KINDS)]](P + i))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for parameter in peft_model.parameters():
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=g) * parameter.shape[-1] ** -0.5)
        paths[f"tenant-{i}"] = os.path.join(directory, f"tenant-{i}")
        peft_model.save_pretrained(paths[f"tenant-{i}"])
    return paths


def _seq2seq_tenants(recorder, device, quick):
    """A mixed batch of 8 T5 tenants in one bank call against PEFT one tenant at a time (see the module docstring)."""
    from peft import PeftModel

    from ..integration.reference_generate import generate_seq2seq_without_cache

    cfg = seq2seq_settings(device, quick)
    base, description = build_seq2seq_lm(device, getattr(torch, cfg["dtype"]))
    rows, new_tokens = cfg["tenants"], cfg["new"]
    recorder.log(f"[serving] {description}; {rows} tenants x 1 row x {cfg['prompt']} prompt tokens, {new_tokens} new, "
                 f"P={cfg['P']}..{cfg['P'] + rows - 1}, kinds {', '.join(_SEQ2SEQ_KINDS)} in turn")
    input_ids, attention_mask = random_batch(base.config.vocab_size, rows, cfg["prompt"], device, seed=2)
    names = [f"tenant-{i}" for i in range(rows)]
    case = f"T5: {rows} tenants (prefix, prompt, p-tuning) / {rows} rows"
    shape = {"model": description, "rows": rows, "prompt_tokens": cfg["prompt"], "new_tokens": new_tokens,
             "P": f"{cfg['P']}..{cfg['P'] + rows - 1}", "tenants": rows, "dtype": cfg["dtype"]}
    with tempfile.TemporaryDirectory(prefix="fastpeft-bench-seq2seq-") as directory:
        paths = _make_seq2seq_adapters(base, rows, cfg["P"], directory)
        # PEFT holds adapters of one type per model: one PeftModel per kind, each tenant's adapter loaded in its kind's.
        peft_of = {}
        for row, name in enumerate(names):
            kind = _SEQ2SEQ_KINDS[row % len(_SEQ2SEQ_KINDS)]
            if kind not in peft_of:
                peft_of[kind] = PeftModel.from_pretrained(copy.deepcopy(base), paths[name], adapter_name=name).eval()
            else:
                peft_of[kind].load_adapter(paths[name], adapter_name=name)
            peft_of[name] = peft_of[kind]

        def peft_per_tenant():
            out = []
            with torch.inference_mode():
                for row, name in enumerate(names):
                    peft_model = peft_of[name]
                    peft_model.set_adapter(name)
                    out.append(peft_model.generate(input_ids=input_ids[row:row + 1],
                                                   attention_mask=attention_mask[row:row + 1],
                                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                   do_sample=False)[0, -new_tokens:])
            return torch.stack(out)

        peft_timing = harness.time_calls(peft_per_tenant, device, warmup=1, reps=cfg["reps"])
        recorder.add_time(SUITE, case, shape, "peft-per-tenant", peft_timing)
        recorder.add(SUITE, case, shape, "peft-per-tenant", "throughput",
                     rows * new_tokens / (peft_timing.median_ms * 1e-3), "tokens/s")
        try:
            import fastpeft

            bank = fastpeft.AdapterBank(copy.deepcopy(base))
            for name in names:
                bank.add(name, paths[name])

            def bank_generate():
                return bank.generate(input_ids, attention_mask=attention_mask, adapters=names, eos_token_id=[],
                                     max_new_tokens=new_tokens, do_sample=False)[:, -new_tokens:]
            timing = harness.time_calls(bank_generate, device, warmup=1, reps=cfg["reps"])
        except Exception as exc:  # report, keep PEFT's numbers
            recorder.note(f"fastpeft-bank on {case}: {exc.__class__.__name__}: {str(exc).strip()[:300]}")
            return
        recorder.add_time(SUITE, case, shape, "fastpeft-bank", timing)
        recorder.add(SUITE, case, shape, "fastpeft-bank", "throughput", rows * new_tokens / (timing.median_ms * 1e-3),
                     "tokens/s")
        recorder.add(SUITE, case, shape, "fastpeft-bank", "speedup", peft_timing.median_ms / timing.median_ms, "x",
                     reference="peft-per-tenant, same run")
        checked = min(CHECKED_ROWS, rows)
        expected = []
        for row, name in enumerate(names[:checked]):
            peft_model = peft_of[name]
            peft_model.set_adapter(name)
            tokens, _ = generate_seq2seq_without_cache(peft_model, input_ids[row:row + 1],
                                                       attention_mask[row:row + 1], max_new_tokens=new_tokens)
            expected.append(tokens[0, -new_tokens:])
        agreement = (bank_generate()[:checked] == torch.stack(expected)).all(dim=1).float().mean()
        recorder.add(SUITE, case, shape, "fastpeft-bank", "token_agreement", agreement, "fraction",
                     reference=f"PEFT's forward looped without a cache, greedy, first {checked} rows")
        bank.close()


def _decode_kernel(recorder, device, quick, copy_gbps):
    from ..ops.prefix_attention import prefix_attention

    for shape in decode_shapes(device, quick):
        B, Hq, Hkv, S, P, D, T = (shape[k] for k in ("B", "Hq", "Hkv", "S", "P", "D", "T"))
        dtype = getattr(torch, shape["dtype"])
        g = torch.Generator().manual_seed(0)

        def randn(*dims):
            return torch.randn(*dims, generator=g).to(device=device, dtype=dtype)
        q, k, v = randn(B, Hq, 1, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D)
        table_k, table_v = randn(T, Hkv, P, D), randn(T, Hkv, P, D)
        prefix_index = (torch.arange(B) % T).to(device=device, dtype=torch.int32)
        distinct = min(B, T)
        moved = harness.decode_bytes(B, Hq, Hkv, S, D, distinct, P, q.element_size())
        case = f"decode B{B} S{S} P{P} T{T} {shape['dtype']}"
        record_shape = {**shape, "L": 1, "bytes": moved}

        def fused():
            return prefix_attention(q, k, v, table_k, table_v, prefix_index=prefix_index)

        def concat():
            keys = torch.cat([table_k.index_select(0, prefix_index.long()), k], dim=2)
            values = torch.cat([table_v.index_select(0, prefix_index.long()), v], dim=2)
            return F.scaled_dot_product_attention(q, repeat_kv(keys, Hq // Hkv), repeat_kv(values, Hq // Hkv))

        with torch.inference_mode():
            for label, fn in (("peft-concat", concat), ("fastpeft", fused)):
                try:
                    timing = harness.time_fn(fn, device, quick)
                except Exception as exc:
                    recorder.note(f"{label} on {case}: {exc.__class__.__name__}: {str(exc).strip()[:300]}")
                    continue
                gbps = moved / (timing.median_ms * 1e-3) / 1e9
                recorder.add_time(SUITE, case, record_shape, label, timing)
                recorder.add(SUITE, case, record_shape, label, "bandwidth", gbps, "GB/s")
                recorder.add(SUITE, case, record_shape, label, "of_copy_bandwidth", gbps / copy_gbps, "fraction",
                             reference=f"device copy {copy_gbps:.1f} GB/s")
            try:
                recorder.add(SUITE, case, record_shape, "fastpeft", "parity",
                             harness.relative_error(fused().float(), concat().float()), "rel",
                             reference="peft-concat (SDPA over the concatenation)")
            except Exception as exc:
                recorder.note(f"decode parity on {case}: {exc.__class__.__name__}: {str(exc).strip()[:300]}")


def run(recorder, device, quick=False, copy_gbps=None):
    """End-to-end multi-tenant generation (a causal LM, then a T5), then the decode kernel's bandwidth (needs the copy
    ceiling)."""
    _end_to_end(recorder, device, quick)
    _seq2seq_tenants(recorder, device, quick)
    if copy_gbps is None:
        from .ceilings import measure_copy, sizes
        copy_gbps = measure_copy(device, sizes(device, quick)[0], quick)[1]
    _decode_kernel(recorder, device, quick, copy_gbps)
