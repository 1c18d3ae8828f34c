"""``fastpeft info``: library versions (and whether they are the tested ones), the device, and which
prefix-attention backends can run here and why the others cannot."""

import json
import os
import sys

from . import common


def add_parser(sub):
    info = sub.add_parser("info", help="versions, device and available backends",
                          description="Print library versions, the device, and which prefix-attention "
                                      "backends (CUDA extension, Triton, sdpa, PyTorch reference) can run here, in "
                                      "dispatch order, and why the others cannot.")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run)


def collect_info():
    import importlib.util
    import warnings

    import torch

    from ..ops import environment
    from ..ops import backend_table
    from ..version import installed_version

    versions = {"fastpeft": common.package_version_string(), "python": sys.version.split()[0]}
    for package in ("torch", "triton", "transformers", "peft", "bitsandbytes"):
        versions[package] = installed_version(package)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                  "cuda": torch.version.cuda}
    else:
        device = {"type": "cpu", "name": "CPU", "threads": torch.get_num_threads(),
                  "why_no_cuda": ("torch was built without CUDA" if torch.version.cuda is None
                                  else "no CUDA device visible")}

    with warnings.catch_warnings():  # the lookups warn once when an extension is missing; we report it here
        warnings.simplefilter("ignore")
        backends = {name: {"available": available, "why": why}
                    for name, available, why in backend_table(torch.device(device["type"]))}
        cpu_extension, cpu_extension_reason = environment.cpu_extension()
    if cpu_extension is None:
        short_cpu = {"available": False, "why": f"{cpu_extension_reason} (the Python path runs instead)"}
    elif not environment.cpu_extension_enabled():
        short_cpu = {"available": False, "why": "FASTPEFT_CPU_EXTENSION=0 (the Python path runs instead)"}
    else:
        short_cpu = {"available": True, "why": "fastpeft._cpu loaded (the sdpa backend's short CPU path in C++)"}
    backends["sdpa"]["cpu_extension"] = short_cpu
    forced = os.environ.get("FASTPEFT_BACKEND") or None

    features = {}
    for feature, module in (("fastpeft.accelerate", "fastpeft.integration.peft"),
                            ("fastpeft.AdapterBank", "fastpeft.bank"),
                            ("fastpeft.MultiPrefixTrainer", "fastpeft.multi")):
        features[feature] = importlib.util.find_spec(module) is not None
    from ..integration.compat import TESTED_VERSIONS, version_status

    tested = {package: {"tested": f"{oldest} to {newest}", "status": version_status(package)[1]}
              for package, (oldest, newest) in TESTED_VERSIONS.items()}
    return {"versions": versions, "tested_versions": tested, "device": device, "backends": backends,
            "forced_backend": forced, "features": features}


def run(args):
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for package, version in info["versions"].items():
        tested = info["tested_versions"].get(package)
        note = f"  ({tested['status']}: fastpeft is tested with {tested['tested']})" if tested else ""
        print(f"  {package:<13} {version or 'not installed'}{note}")
    device = info["device"]
    if device["type"] == "cuda":
        print(f"device: {device['name']} (compute capability {device['capability']}, {device['memory_gib']} GiB, "
              f"CUDA {device['cuda']}, {device['count']} visible)")
    else:
        print(f"device: CPU, {device['threads']} threads ({device['why_no_cuda']})")
    print("prefix_attention backends (dispatch order):")
    for backend, state in info["backends"].items():
        print(f"  {backend:<10} {'yes' if state['available'] else 'no ':<4} {state['why']}")
        if "cpu_extension" in state:
            extension = state["cpu_extension"]
            print(f"    C++ short path {'yes' if extension['available'] else 'no'}: {extension['why']}")
    if info["forced_backend"]:
        print(f"  FASTPEFT_BACKEND={info['forced_backend']} forces that backend")
    print("integrations:")
    for feature, present in info["features"].items():
        print(f"  {feature:<28} {'installed' if present else 'not in this install'}")
    return 0
