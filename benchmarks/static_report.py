"""Static report of the Triton kernels: what the compiler makes of every kept config, without a GPU. A developer
tool (``benchmarks/bench_static.py`` runs it), not part of the installed package.

Every launch that ``fastpeft.kernels.prefix_attention`` makes at the benchmark shapes is captured by running the
real launchers on ``meta`` tensors (no memory, no device) with Triton's launch (``kernel[grid](...)``) swapped for a
recorder. Each
autotuned launch keeps the configs the launcher's own pruner keeps (``Autotuner.prune_configs``), and every
kept config is compiled for a target (default ``sm_90a``) with ``triton.compile`` and a ``GPUTarget``, its
arguments bound through Triton's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``,
what ``kernel[grid](...)`` does on a GPU): the same value specializations (a stride or ``T`` equal to 1 becomes
a constant) and the same 16-byte alignment/divisibility attributes as a real launch, so loads vectorize and
shared memory is sized as they would be on the device. (A hand-made signature without those attributes
compiles to scalar loads and half the shared memory: that is why the old ``tests/prefix_attention_sm90.py``
under-reported.) ``meta`` tensors report ``data_ptr() == 0``, i.e. aligned, as the CUDA caching allocator's
blocks are.

Per compiled kernel the report gives: registers, spill stores/loads and stack (from Triton's own ``ptxas -v``
command, re-run on the same PTX and checked to reproduce Triton's cubin byte for byte), shared memory, CTAs per
SM as limited by registers, shared memory and warps, the grid and its waves over the SMs, wgmma vs mma.sync,
TMA / cp.async (with width) / global load and store widths, atomics (PTX), ``tt.dot`` ops per innermost loop
(TTIR), and the SASS instruction mix of every innermost loop that does matrix work; the "main loop" is the one
with the most MMA instructions (ties: the shortest, i.e. the unmasked one).

    python benchmarks/bench_static.py [--target sm_90a] [--shapes main,d64,mask] [--out DIR]

Writes ``OUT/static-<target>-triton-<version>.json`` and ``.md``. Needs Triton with its NVIDIA backend (it ships
ptxas, cuobjdump and nvdisasm); no GPU, no CUDA torch. ``TRITON_INTERPRET`` must be unset (the kernels are
then decorated for compilation); the command line re-executes itself without it when needed.
"""

import contextlib
import datetime
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections import Counter

SCHEMA = "fastpeft-static/1"

# Device limits per target: SMs, 32-bit registers per SM, shared memory per SM / per CTA (bytes, opt-in
# maximum), shared memory the driver reserves per CTA, resident warps and CTAs per SM. (H100 SXM, A100.)
TARGETS = {
    "sm_90a": dict(capability=90, sms=132, regs_per_sm=65536, smem_per_sm=233472, smem_per_cta=232448,
                   reserved_smem_per_cta=1024, max_warps_per_sm=64, max_ctas_per_sm=32),
    "sm_80": dict(capability=80, sms=108, regs_per_sm=65536, smem_per_sm=167936, smem_per_cta=166912,
                  reserved_smem_per_cta=1024, max_warps_per_sm=64, max_ctas_per_sm=32),
}
REG_ALLOC_UNIT = 256   # registers are allocated per warp in units of 256 (8 per thread)

MAIN_SHAPE = dict(B=8, Hq=32, Hkv=8, L=2048, P=128, D=128, dtype="bfloat16", causal=True, mask=False)
SHAPES = {
    "main": MAIN_SHAPE,                                  # the benchmark shape of issue #7
    "d64": {**MAIN_SHAPE, "D": 64},
    "mask": {**MAIN_SHAPE, "mask": True},                # a key padding mask (what accelerate passes in training)
    # Not a benchmark shape: float32, a head size that is not a power of two, and L, T and the GQA group equal to
    # 1 (launched as constants): the cases whose compile errors the interpreter cannot see.
    "edge": dict(B=2, Hq=2, Hkv=2, L=1, P=5, D=40, dtype="float32", causal=False, mask=False),
}
DEFAULT_SHAPES = ("main", "d64", "mask")


def shape_label(shape):
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[shape["dtype"]]
    label = (f"{short} B{shape['B']} H{shape['Hq']}/{shape['Hkv']} L{shape['L']} P{shape['P']} D{shape['D']}"
             f"{' causal' if shape['causal'] else ''}{' +mask' if shape['mask'] else ''}")
    return label


# ----------------------------------------------------------------------------------------------------------
# Capturing the launches


class _Launch:
    """One kernel launch as the launcher made it: the kernel object (Autotuner or JITFunction), grid, args."""

    def __init__(self, call, name, kernel, grid, args, kwargs):
        self.call, self.name, self.kernel, self.grid, self.args, self.kwargs = call, name, kernel, grid, args, kwargs

    @property
    def jit_fn(self):
        # An Autotuner wraps the JITFunction in .fn (a JITFunction's own .fn is the Python function).
        return self.kernel.fn if hasattr(self.kernel, "prune_configs") else self.kernel

    def kept_configs(self):
        """The configs the launcher keeps for this launch (its autotuner's pruner), or the launch's own."""
        import triton

        if hasattr(self.kernel, "prune_configs"):
            self.kernel.nargs = dict(zip(self.kernel.arg_names, self.args))
            try:
                return list(self.kernel.prune_configs(self.kwargs))
            finally:
                self.kernel.nargs = None
        return [triton.Config({}, num_warps=self.kwargs.get("num_warps", 4),
                              num_stages=self.kwargs.get("num_stages", 3))]

    def grid_for(self, config):
        if not callable(self.grid):
            return tuple(self.grid)
        named = dict(zip(self.jit_fn.arg_names, self.args))
        return tuple(self.grid({**named, **self.kwargs, **config.all_kwargs()}))


@contextlib.contextmanager
def _recording(sink, call):
    """Within the block every Triton launch ``kernel[grid](*args, **kwargs)`` is recorded into ``sink`` (as a
    ``_Launch`` of the call named ``call[0]``) instead of running."""
    from triton.runtime.jit import KernelInterface

    def record(kernel, grid):
        def launch(*args, **kwargs):
            function = kernel.fn if hasattr(kernel, "prune_configs") else kernel   # an Autotuner wraps its kernel
            sink.append(_Launch(call[0], function.fn.__name__, kernel, grid, args, kwargs))
        return launch

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = record
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def _kernels_module():
    import fastpeft.kernels.prefix_attention as module

    if module.INTERPRETING:
        raise RuntimeError("the Triton kernels were decorated for the interpreter: unset TRITON_INTERPRET "
                           "before fastpeft.kernels is first imported")
    return module


def bwd_modes(module):
    """The backward variants the kernel module offers (``BWD_MODES``), the default first."""
    return tuple(module.BWD_MODES)


def capture_launches(shape):
    """Every launch of the forward and the backward (each backward mode, atomic and deterministic prefix
    reduction) at ``shape``, on meta tensors."""
    import torch

    K = _kernels_module()
    B, Hq, Hkv, L, P, D = (shape[k] for k in ("B", "Hq", "Hkv", "L", "P", "D"))
    meta = dict(device="meta", dtype=getattr(torch, shape["dtype"]))
    q = torch.empty(B, Hq, L, D, **meta)
    k, v = torch.empty(B, Hkv, L, D, **meta), torch.empty(B, Hkv, L, D, **meta)
    prefix_k, prefix_v = torch.empty(1, Hkv, P, D, **meta), torch.empty(1, Hkv, P, D, **meta)
    # What fastpeft.prefix_attention passes for a shared [Hkv, P, D] prefix (see fastpeft/ops/prefix_attention.py).
    prefix_index = torch.zeros(B, dtype=torch.int32, device="meta")
    prefix_lengths = torch.full((1,), P, dtype=torch.int32, device="meta")
    mask = torch.ones(B, L, dtype=torch.bool, device="meta") if shape["mask"] else None
    scale = D ** -0.5
    launches, call = [], ["fwd"]
    with _recording(launches, call):
        out, lse = K.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask,
                                          shape["causal"], scale)
        # Each backward mode with the atomic prefix reduction, then deterministic=True (one mode: the launcher
        # picks the variant without atomics).
        runs = [(mode, False) for mode in bwd_modes(K)] + [(None, True)]
        for mode, deterministic in runs:
            call[0] = f"bwd[{mode}]" if not deterministic else "bwd[deterministic]"
            K.prefix_attention_bwd(q, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, out,
                                   lse, shape["causal"], scale, deterministic, mode=mode)
    return launches


# ----------------------------------------------------------------------------------------------------------
# Compiling


def _backend(target_name):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", TARGETS[target_name]["capability"], 32)
    return target, make_backend(target)


def compile_launch(launch, config, target, backend):
    """``triton.compile`` of one launch with one config, specialized exactly as ``kernel[grid](...)`` would be."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    fn = launch.jit_fn
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    return compiled, _specialized_names(fn, signature)


def _specialized_names(fn, signature):
    """Non-constexpr parameters that the launch turned into constants (a value of 1)."""
    declared = {p.name for p in fn.params if p.is_constexpr}
    return sorted(name for name, kind in signature.items() if kind == "constexpr" and name not in declared)


def _tool(name, capability):
    """Path of a CUDA tool Triton ships (ptxas as Triton picks it for ``capability``; cuobjdump; nvdisasm)."""
    from triton.backends.nvidia import compiler as nvidia_compiler

    ptxas = nvidia_compiler.get_ptxas(capability).path
    if name == "ptxas":
        return ptxas
    candidate = os.path.join(os.path.dirname(ptxas), name)
    if os.path.exists(candidate):
        return candidate
    from triton import knobs

    return getattr(knobs.nvidia, name).path


_PTXAS_FLAG_SETS = (["-lineinfo", "-v", "--regAllocOptLevel=2"], ["-lineinfo", "-v"])


def ptxas_report(ptx, cubin, arch, capability, workdir):
    """Registers, spills, stack and barriers from ``ptxas -v`` on Triton's PTX with Triton's flags; the flags whose
    output equals Triton's cubin byte for byte are used (``reproduced`` says whether any did)."""
    ptxas = _tool("ptxas", capability)
    src = os.path.join(workdir, "kernel.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    first = None
    for flags in _PTXAS_FLAG_SETS:
        out = os.path.join(workdir, "kernel.cubin")
        result = subprocess.run([ptxas, *flags, f"--gpu-name={arch}", src, "-o", out],
                                capture_output=True, text=True)
        if result.returncode != 0:
            continue
        with open(out, "rb") as f:
            reproduced = f.read() == cubin
        parsed = _parse_ptxas_log(result.stdout + result.stderr)
        parsed["reproduced_triton_cubin"] = reproduced
        if reproduced:
            return parsed
        first = first or parsed
    if first is None:
        raise RuntimeError(f"{ptxas} could not assemble the PTX Triton produced")
    return first


def _parse_ptxas_log(log):
    def grab(pattern, default=0):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else default

    return {
        "registers": grab(r"Used (\d+) registers"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
        "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
        "barriers": grab(r"used (\d+) barriers"),
    }


# ----------------------------------------------------------------------------------------------------------
# Reading the PTX, TTIR and SASS

_PTX_WIDTH_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
                   "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


def ptx_features(ptx):
    """Matrix instructions, memory paths with their widths (bytes per thread per instruction) and atomics."""
    lines = [line.strip() for line in ptx.splitlines()]

    def count(prefix):
        return sum(1 for line in lines if line.startswith(prefix) or re.match(r"@%?!?\w+ " + re.escape(prefix), line))

    def strip_pred(line):
        return re.sub(r"^@!?%?\w+\s+", "", line)

    body = [strip_pred(line) for line in lines]
    cp_async = Counter()
    global_loads, global_stores, atomics = Counter(), Counter(), Counter()
    for line in body:
        if line.startswith("cp.async.") and ".shared.global" in line and "bulk" not in line:
            m = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)", line)
            cp_async[int(m.group(1), 0) if m else 0] += 1
        elif line.startswith("ld.global"):
            global_loads[_ptx_access_bytes(line)] += 1
        elif line.startswith("st.global"):
            global_stores[_ptx_access_bytes(line)] += 1
        elif line.startswith(("atom.", "red.")):
            atomics[line.split()[0]] += 1
    wgmma = sum(1 for line in body if line.startswith("wgmma.mma_async"))
    mma_sync = sum(1 for line in body if line.startswith("mma.sync"))
    shapes = sorted({m.group(1) for line in body for m in [re.match(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)",
                                                                     line)] if m}
                    | {m.group(1) for line in body for m in [re.match(r"mma\.sync\.aligned\.(m\d+n\d+k\d+)", line)] if m})
    return {
        "mma": "wgmma" if wgmma else "mma.sync" if mma_sync else "none",
        "wgmma": wgmma,
        "mma_sync": mma_sync,
        "mma_shapes": shapes,
        "tma": sum(1 for line in body if line.startswith("cp.async.bulk.tensor")),
        "cp_async_by_bytes": {str(k): v for k, v in sorted(cp_async.items())},
        "ld_global_by_bytes": {str(k): v for k, v in sorted(global_loads.items())},
        "st_global_by_bytes": {str(k): v for k, v in sorted(global_stores.items())},
        "atomics": dict(sorted(atomics.items())),
    }


def _ptx_access_bytes(line):
    op = line.split()[0]
    parts = op.split(".")
    vec = 1
    for part in parts:
        if part in ("v2", "v4", "v8"):
            vec = int(part[1:])
    bits = next((_PTX_WIDTH_BITS[p] for p in reversed(parts) if p in _PTX_WIDTH_BITS), 0)
    return vec * bits // 8


def ttir_dots_per_loop(ttir):
    """``tt.dot`` ops in each innermost ``scf.for`` of the TTIR, in source order (the matmuls per iteration)."""
    stack, loops = [], []     # stack of [is_for, dots, has_inner_for]
    for line in ttir.splitlines():
        text = line.strip()
        opens = text.count("{") - text.count("}")
        if "tt.dot" in text and stack:
            for frame in stack:
                if frame[0]:
                    frame[1] += 1
        if opens > 0:
            is_for = "scf.for" in text
            if is_for:
                for frame in stack:
                    if frame[0]:
                        frame[2] = True
            stack.append([is_for, 0, False])
        elif opens < 0:
            for _ in range(-opens):
                if stack:
                    is_for, dots, inner = stack.pop()
                    if is_for and not inner:
                        loops.append(dots)
    return [d for d in loops if d]


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")

# Groups of the SASS instruction mix (by the opcode before its first dot).
MIX_GROUPS = [
    ("mma", ("HGMMA", "HMMA", "IMMA")),
    ("ffma", ("FFMA",)),
    ("fmul", ("FMUL",)),
    ("fadd", ("FADD",)),
    ("mufu", ("MUFU",)),
    ("fp_cmp_sel", ("FSEL", "FSETP", "FMNMX", "FCHK")),
    ("convert", ("F2F", "F2FP", "F2I", "I2F", "I2FP")),
    ("int", ("IMAD", "IADD3", "IADD", "LEA", "LOP3", "ISETP", "SHF", "SEL", "IABS", "IMNMX", "VIMNMX", "PRMT",
             "SGXT", "LEA.HI", "UIADD3", "UIMAD", "ULEA", "ULOP3", "USHF", "UISETP", "USEL", "UMOV", "MOV", "IMUL")),
    ("ld_global", ("LDG", "LDGSTS", "LDGDEPBAR", "UTMALDG", "UBLKCP", "UTMAPF")),
    ("st_global", ("STG", "UTMASTG")),
    ("shared", ("LDS", "LDSM", "STS", "STSM")),
    ("sync", ("BAR", "WARPGROUP", "WARPSYNC", "SYNCS", "DEPBAR", "MEMBAR", "FENCE", "ARRIVES")),
    ("shfl", ("SHFL",)),
    ("atomic", ("RED", "ATOM", "ATOMG", "ATOMS", "REDG")),
    ("spill", ("STL", "LDL")),
]


def _group(opcode):
    base = opcode.split(".")[0]
    for name, members in MIX_GROUPS:
        if base in members:
            return name
    return "other"


def sass_instructions(sass):
    """``[(address, opcode, operands)]`` of the first function in ``cuobjdump -sass`` output."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS_LINE.search, sass.splitlines()) if m]


def sass_loops(instructions):
    """Innermost loops (a backward branch and its target) as ``{start, end, instructions, mix, opcodes}``."""
    edges = []
    for address, opcode, operands in instructions:
        if opcode.split(".")[0] == "BRA":
            m = re.search(r"0x([0-9a-f]+)", operands)
            if m and int(m.group(1), 16) <= address:
                edges.append((int(m.group(1), 16), address))
    innermost = [(s, e) for s, e in edges
                 if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in edges)]
    loops = []
    for start, end in sorted(set(innermost)):
        body = [op for address, op, _ in instructions if start <= address <= end]
        loops.append({"start": hex(start), "end": hex(end), "instructions": len(body), "mix": mix(body),
                      "opcodes": dict(Counter(op for op in body).most_common())})
    return loops


def mix(opcodes):
    counts = Counter(_group(op) for op in opcodes)
    return {name: counts.get(name, 0) for name, _ in MIX_GROUPS + [("other", ())]}


def occupancy(target, registers, shared_bytes, num_warps):
    """CTAs per SM allowed by registers, shared memory and warps (and the hardware cap)."""
    t = TARGETS[target]
    per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = t["regs_per_sm"] // (per_warp * num_warps) if registers else t["max_ctas_per_sm"]
    need = shared_bytes + t["reserved_smem_per_cta"]
    by_smem = 0 if shared_bytes > t["smem_per_cta"] else t["smem_per_sm"] // need
    by_warps = t["max_warps_per_sm"] // num_warps
    return {"by_registers": by_regs, "by_shared": by_smem, "by_warps": by_warps,
            "ctas_per_sm": min(by_regs, by_smem, by_warps, t["max_ctas_per_sm"])}


# ----------------------------------------------------------------------------------------------------------
# The report


def _config_dict(config):
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _public_constexprs(launch):
    return {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}


def analyze(launch, config, target_name, target, backend, workdir):
    compiled, specialized = compile_launch(launch, config, target, backend)
    asm = compiled.asm
    arch = f"sm_{TARGETS[target_name]['capability']}" + ("a" if TARGETS[target_name]["capability"] == 90 else "")
    ptxas = ptxas_report(asm["ptx"], asm["cubin"], arch, TARGETS[target_name]["capability"], workdir)
    cubin_path = os.path.join(workdir, "triton.cubin")
    with open(cubin_path, "wb") as f:
        f.write(asm["cubin"])
    sass = subprocess.run([_tool("cuobjdump", TARGETS[target_name]["capability"]), "-sass", cubin_path],
                          capture_output=True, text=True, check=True).stdout
    instructions = sass_instructions(sass)
    loops = sass_loops(instructions)
    mma_loops = [loop for loop in loops if loop["mix"]["mma"]]
    main_loop = (max(mma_loops, key=lambda loop: (loop["mix"]["mma"], -loop["instructions"])) if mma_loops
                 else max(loops, key=lambda loop: loop["instructions"]) if loops else None)
    shared = int(compiled.metadata.shared)
    num_warps = config.num_warps
    grid = launch.grid_for(config)
    ctas = 1
    for g in grid:
        ctas *= int(g)
    occ = occupancy(target_name, ptxas["registers"], shared, num_warps)
    sms = TARGETS[target_name]["sms"]
    all_ops = [op for _, op, _ in instructions]
    for loop in loops:
        if loop is not main_loop:
            del loop["opcodes"]   # the full opcode histogram only for the main loop (keeps the JSON readable)
    return {
        "kernel": launch.name,
        "calls": [launch.call],
        "config": _config_dict(config),
        "constexprs": _public_constexprs(launch),
        "specialized_to_1": specialized,
        **ptxas,
        "shared_bytes": shared,
        "occupancy": occ,
        "grid": list(grid),
        "ctas": ctas,
        "waves": round(ctas / (occ["ctas_per_sm"] * sms), 2) if occ["ctas_per_sm"] else None,
        **ptx_features(asm["ptx"]),
        "dots_per_loop": ttir_dots_per_loop(asm["ttir"]),
        "sass_instructions": len(all_ops),
        "sass_mix": mix(all_ops),
        "sass_ffma_fmul": [all_ops.count("FFMA") + sum(op.startswith("FFMA.") for op in all_ops),
                           all_ops.count("FMUL") + sum(op.startswith("FMUL.") for op in all_ops)],
        "loops": loops,
        "main_loop": main_loop,
    }


def _launch_key(launch, config):
    return (launch.name, json.dumps(_public_constexprs(launch), sort_keys=True, default=str),
            json.dumps(_config_dict(config), sort_keys=True), repr(launch.grid_for(config)))


def planned_compiles(shape, quick=False, only=None, calls=None):
    """``[(launch, config, calls, kept)]``: each distinct (kernel, constexprs, config, grid) once, with every call
    (fwd, a backward mode) that launches it. ``only``: keep kernels whose short name contains one of these;
    ``calls``: keep launches of these calls (``fwd``, ``bwd[fused]``, ``bwd[split]``, ``bwd[deterministic]``)."""
    plan, index = [], {}
    for launch in capture_launches(shape):
        if only and not any(part in _short_name(launch.name) for part in only):
            continue
        if calls and launch.call not in calls:
            continue
        configs = launch.kept_configs()
        for config in configs[:1] if quick else configs:
            key = _launch_key(launch, config)
            if key in index:
                seen_calls = plan[index[key]][2]
                if launch.call not in seen_calls:
                    seen_calls.append(launch.call)
                continue
            index[key] = len(plan)
            plan.append((launch, config, [launch.call], len(configs)))
    return plan


def build_report(target_name="sm_90a", shape_names=DEFAULT_SHAPES, quick=False, shard=(0, 1), only=None,
                 calls=None, log=print):
    """The report as a dict (schema ``fastpeft-static/1``); ``quick`` compiles only the first kept config of each
    launch; ``shard=(i, n)`` only every n-th compile from the i-th (``merge_reports`` joins the shards)."""
    target, backend = _backend(target_name)
    module = _kernels_module()
    report = {"schema": SCHEMA, "meta": _meta(target_name, module, quick), "shapes": []}
    position = 0
    with tempfile.TemporaryDirectory(prefix="fastpeft-static-") as workdir:
        for shape_name in shape_names:
            shape = SHAPES[shape_name]
            entries = []
            for launch, config, launch_calls, kept in planned_compiles(shape, quick, only, calls):
                mine = position % shard[1] == shard[0]
                position += 1
                if not mine:
                    continue
                entry = analyze(launch, config, target_name, target, backend, workdir)
                entry.update(calls=launch_calls, kept_configs=kept, order=position - 1)
                entries.append(entry)
                log(_log_line(entry))
            report["shapes"].append({"name": shape_name, "label": shape_label(shape), "shape": shape,
                                     "kernels": entries})
    return report


def merge_reports(shards):
    """One report from the shards of ``build_report`` (same target, shapes and source), compiles in plan order."""
    merged = json.loads(json.dumps(shards[0]))
    for i, shape in enumerate(merged["shapes"]):
        kernels = [e for part in shards for e in part["shapes"][i]["kernels"]]
        shape["kernels"] = sorted(kernels, key=lambda e: e["order"])
    return merged


def _meta(target_name, module, quick):
    import triton

    # The kernels' sources: every module of the kernel package (kernels, device helpers, configs, launchers).
    folder = os.path.dirname(module.__file__)
    sources = sorted(name for name in os.listdir(folder) if name.endswith(".py"))
    digest = hashlib.sha256()
    for name in sources:
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(f.read())
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=folder, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                               cwd=folder, check=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    ptxas_version = subprocess.run([_tool("ptxas", TARGETS[target_name]["capability"]), "--version"],
                                   capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    return {
        "target": target_name,
        "limits": TARGETS[target_name],
        "triton": triton.__version__,
        "ptxas": ptxas_version[0] if ptxas_version else None,
        "kernel_sources": sources,
        "kernel_sources_sha256": digest.hexdigest()[:16],
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "bwd_modes": list(bwd_modes(module)),
    }


def _short_name(kernel):
    name = kernel[:-len("_kernel")] if kernel.endswith("_kernel") else kernel
    for lead in ("_prefix_attn_", "_prefix_"):
        if name.startswith(lead):
            return name[len(lead):]
    return name.lstrip("_")


# The matrix-row dimension of each kernel's dots (wgmma needs 64 rows per warpgroup): the query tile for kernels
# that own a query block and loop over keys, the key tile for those that own a key block and loop over queries.
_QUERY_TILED = ("_prefix_attn_fwd_kernel", "_prefix_attn_bwd_dq_kernel")


def mma_rows(entry):
    config = entry["config"]
    return config.get("BLOCK_M" if entry["kernel"] in _QUERY_TILED else "BLOCK_N", 0)


def _tile(entry):
    c = entry["config"]
    dims = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_P") if k in c)
    return f"{dims or '-'} w{c['num_warps']} s{c['num_stages']}"


def _log_line(e):
    return (f"  {_short_name(e['kernel']):<16} {_tile(e):<16} regs {e['registers']:>3}  spill "
            f"{e['spill_store_bytes']:>4}/{e['spill_load_bytes']:<4} smem {e['shared_bytes']:>6}  "
            f"CTAs/SM {e['occupancy']['ctas_per_sm']}  {e['mma']}  [{', '.join(e['calls'])}]")


def _widths(histogram):
    return " ".join(f"{v}x{k}B" for k, v in histogram.items()) or "-"


def render_markdown(report):
    m = report["meta"]
    out = [f"# Static kernel report: {m['target']}, Triton {m['triton']}", "",
           f"{m['ptxas']}; kernels `{', '.join(m['kernel_sources'])}` sha256 {m['kernel_sources_sha256']} "
           f"(commit {m['commit']}), {m['date']}{', quick (first kept config only)' if m['quick'] else ''}. "
           f"Compiled offline with real-launch specializations (see `benchmarks/static_report.py`); no GPU ran. "
           f"CTAs/SM = min(by registers, by shared memory incl. {m['limits']['reserved_smem_per_cta']} B reserved, "
           f"by warps); waves = grid CTAs / (CTAs/SM x {m['limits']['sms']} SMs). Backward modes: "
           f"{', '.join(m['bwd_modes'])}.", ""]
    for shape in report["shapes"]:
        out += [f"## {shape['label']}", "",
                "| kernel | tile (M x N, warps, stages) | calls | regs | spill st/ld B | smem B | CTAs/SM reg/smem/warps -> | "
                "grid CTAs (waves) | MMA | cp.async | ld.global | atomics | dots/loop |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in shape["kernels"]:
            occ = e["occupancy"]
            mma = e["mma"] + (f" {'/'.join(e['mma_shapes'])}" if e["mma_shapes"] else "")
            mma += f" TMA {e['tma']}" if e["tma"] else ""
            atomics = " ".join(f"{v}x{k}" for k, v in e["atomics"].items()) or "-"
            out.append(
                f"| {_short_name(e['kernel'])} | {_tile(e)} | {', '.join(e['calls'])} | {e['registers']} | "
                f"{e['spill_store_bytes']}/{e['spill_load_bytes']} | {e['shared_bytes']} | "
                f"{occ['by_registers']}/{occ['by_shared']}/{occ['by_warps']} -> **{occ['ctas_per_sm']}** | "
                f"{e['ctas']} ({e['waves']}) | {mma} | {_widths(e['cp_async_by_bytes'])} | "
                f"{_widths(e['ld_global_by_bytes'])} | {atomics} | {e['dots_per_loop']} |")
        out += ["", "Main loop (the innermost SASS loop with the most MMA instructions; ties: the shortest):", "",
                "| kernel | tile | loops | instr | MMA | FFMA | FMUL | FADD | MUFU | cmp/sel | cvt | int | ld.global | "
                "shared | sync | shfl | atomic | spill | other | kernel FFMA/FMUL |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in shape["kernels"]:
            loop = e["main_loop"]
            if loop is None:
                continue
            x = loop["mix"]
            out.append(
                f"| {_short_name(e['kernel'])} | {_tile(e)} | {len(e['loops'])} | {loop['instructions']} | {x['mma']} | "
                f"{x['ffma']} | {x['fmul']} | {x['fadd']} | {x['mufu']} | {x['fp_cmp_sel']} | {x['convert']} | "
                f"{x['int']} | {x['ld_global']} | {x['shared']} | {x['sync']} | {x['shfl']} | {x['atomic']} | "
                f"{x['spill']} | {x['other']} | {e['sass_ffma_fmul'][0]}/{e['sass_ffma_fmul'][1]} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def check(report, max_head_dim=128):
    """Problems the test and ``--check`` flag: spills in a kept config at D <= ``max_head_dim``, and a tile of 64
    or more MMA rows (``mma_rows``: BLOCK_M of query-tiled kernels, BLOCK_N of key-tiled ones) whose matrix
    instructions are mma.sync instead of wgmma on sm_90a (16-bit inputs)."""
    problems = []
    for shape in report["shapes"]:
        if shape["shape"]["D"] > max_head_dim:
            continue
        for e in shape["kernels"]:
            where = f"{shape['name']}: {_short_name(e['kernel'])} {_tile(e)}"
            if e["spill_store_bytes"] or e["spill_load_bytes"]:
                problems.append(f"{where} spills {e['spill_store_bytes']}/{e['spill_load_bytes']} B")
            half = shape["shape"]["dtype"] in ("bfloat16", "float16")   # float32 (IEEE) dots never use wgmma
            if report["meta"]["target"] == "sm_90a" and half and mma_rows(e) >= 64 and not e["wgmma"] and e["mma_sync"]:
                problems.append(f"{where} lost wgmma ({e['mma']})")
    return problems


def write_report(report, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    m = report["meta"]
    partial = "-quick" if m["quick"] else ""
    stem = os.path.join(out_dir, f"static-{m['target']}-triton-{m['triton']}{partial}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, sort_keys=False)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(render_markdown(report))
    return stem + ".json", stem + ".md"
