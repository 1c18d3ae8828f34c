"""Autotuning of the training/prefill kernels: the configs each kernel may run, for which cases each is kept (the
ones that compile for sm_90a without register spills), and the pruner that applies that per launch."""

import triton

from .common import INTERPRETING


def _any_case(block_d, dq_atomic, has_mask):
    return True


def _up_to_d64(block_d, dq_atomic, has_mask):
    return block_d <= 64


def _wide_head(block_d, dq_atomic, has_mask):
    # Up to D=64 the larger configs cover every case (and this one spills the fused prefix kernel at D=64 under
    # Triton 3.9); it stays the fallback when nothing else is kept.
    return block_d > 64


def _not_fused_d128(block_d, dq_atomic, has_mask):
    return block_d <= 64 or not dq_atomic


def _configs(shapes):
    """triton.Config list from ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, where])``; one small config when
    interpreting (autotuning there would only multiply the interpreter's run time).

    ``where(block_d, dq_atomic, has_mask)`` says for which cases the pruner keeps the config: the ones where it
    compiles for sm_90a without register spills (``benchmarks/results/static-*``, checked by
    ``tests/test_static_report.py``)."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    configs = []
    for m, n, w, s, *where in shapes:
        config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        config.fastpeft_where = where[0] if where else _any_case
        configs.append(config)
    return configs


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles do not fit a wide head (by bytes per row: fp32 rows are twice as wide as
    bf16 ones) in registers and shared memory, configs that spill registers in this case (their ``where``),
    and query tiles much taller than L."""
    row_bytes = kwargs["BLOCK_D"] * named_args["q_ptr"].element_size()
    max_tile = 32 if row_bytes > 512 else 64 if row_bytes > 256 else None
    bucket_l = named_args["bucket_l"]
    case = (kwargs["BLOCK_D"], bool(kwargs.get("DQ_ATOMIC", False)), bool(kwargs.get("HAS_MASK", False)))
    kept = []
    for config in configs:
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if max_tile is not None and max(block_m, block_n) > max_tile:
            continue
        if block_m > max(16, bucket_l) and bucket_l < 64:
            continue
        if not getattr(config, "fastpeft_where", _any_case)(*case):
            continue
        kept.append(config)
    return kept or configs[-1:]


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, where]). The last entry of each list, 32 x 32, is the pruner's
# fallback: it fits every head size and dtype. (The small configs' warps and stages are the ones that do not spill
# under Triton 3.6's ptxas either, which caps some 4-warp kernels at 128 registers.)
FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2, _up_to_d64), (128, 128, 8, 3, _up_to_d64),
                         (64, 128, 4, 2, _up_to_d64), (128, 32, 4, 3, _up_to_d64), (64, 64, 4, 3),
                         (16, 64, 4, 1, _up_to_d64), (64, 32, 4, 2), (32, 32, 4, 2)])
DQ_CONFIGS = _configs([(128, 32, 8, 2), (64, 64, 4, 2), (16, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)])
# For the dk/dv kernels BLOCK_N is the key tile each program owns and BLOCK_M the query tile it loops over.
# At D=128 their two float32 [BLOCK_N, 128] accumulators take 128 registers a thread; only 16-row query tiles
# (32 without the fused dq) leave room for the rest.
DKDV_CONFIGS = _configs([(16, 128, 8, 2), (16, 128, 8, 3), (32, 128, 8, 2, _up_to_d64),
                          (32, 64, 8, 2, _not_fused_d128), (16, 64, 4, 2, _up_to_d64), (32, 64, 4, 2, _up_to_d64),
                          (32, 32, 8, 1, _wide_head)])

AUTOTUNE_KEY = ["BLOCK_D", "bucket_l", "bucket_s", "CAUSAL", "HAS_MASK"]
DKDV_AUTOTUNE_KEY = AUTOTUNE_KEY + ["DQ_ATOMIC"]
PRUNE = {"early_config_prune": _prune_configs}
