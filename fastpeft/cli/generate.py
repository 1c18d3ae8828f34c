"""``fastpeft generate``: batched generation from one base model and several adapters, one output per
(prompt, adapter) pair, all adapters in one batch (``fastpeft.AdapterBank``) or, to compare, plain PEFT."""

import json
import os

from .. import loading
from . import common


def add_parser(sub):
    generate = sub.add_parser(
        "generate", help="batched generation with several adapters at once",
        description="Generate from one base model and several soft-prompt adapters in one batch "
                    "(fastpeft.AdapterBank): one output per (prompt, adapter) pair.")
    generate.add_argument("--model", metavar="DIR", help="base model directory; default: the base model the "
                          "first adapter was trained on (adapter_config.json's base_model_name_or_path)")
    generate.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                          help="a PEFT prompt-learning adapter directory, with a name (repeatable; a bare DIR "
                               "is named after its directory)")
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    generate.add_argument("--prompt-file", metavar="FILE", help="more prompts, one per line")
    generate.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                          help="tokens to generate per output (default: 32)")
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    generate.add_argument("--batch-size", type=int, default=64, help="rows per generate call (default: 64)")
    generate.add_argument("--engine", choices=("bank", "peft"), default="bank",
                          help="bank: every adapter in one batch through fastpeft.AdapterBank (default); "
                               "peft: plain PEFT, one request at a time, by its forward without a KV cache (a slow "
                               "reference to compare with)")
    generate.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    gen_quant = generate.add_mutually_exclusive_group()
    gen_quant.add_argument("--load-in-4bit", action="store_true", help="load the base model in 4-bit (bitsandbytes)")
    gen_quant.add_argument("--load-in-8bit", action="store_true", help="load the base model in 8-bit (bitsandbytes)")
    common.add_device_arguments(generate)
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.set_defaults(func=run)



def _parse_adapters(specs):
    """``NAME=DIR`` or ``DIR`` -> ordered {name: dir}; every directory must hold adapter_config.json."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = os.path.basename(os.path.normpath(spec))
        if not name or not path:
            raise common.CLIError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in adapters:
            raise common.CLIError(f"--adapter: the name {name!r} is used twice")
        if not os.path.isdir(path):
            raise common.CLIError(f"--adapter {name}={path}: no such directory")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise common.CLIError(f"--adapter {name}={path}: not a PEFT adapter directory (no adapter_config.json)")
        adapters[name] = path
    return adapters


def _read_prompts(args):
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise common.CLIError(f"--prompt-file {args.prompt_file}: no such file")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line for line in f.read().splitlines() if line.strip()]
    if not prompts:
        raise common.CLIError("give at least one --prompt or a --prompt-file")
    return prompts


def _generation_kwargs(args):
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    return kwargs


def _generate_with_bank(model, tokenizer, adapters, requests, args, device):
    """Every (prompt, adapter) request through one AdapterBank, ``--batch-size`` rows per call."""
    import torch

    import fastpeft

    sampling = {"generator": torch.Generator(device).manual_seed(args.seed)} if args.do_sample else {}
    completions = []
    with fastpeft.AdapterBank(model) as bank:
        for name, path in adapters.items():
            bank.add(name, path)
        for start in range(0, len(requests), args.batch_size):
            chunk = requests[start:start + args.batch_size]
            encoded = tokenizer([prompt for prompt, _ in chunk], return_tensors="pt", padding=True).to(device)
            generated = bank.generate(encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                      adapters=[name for _, name in chunk], **_generation_kwargs(args), **sampling)
            completions += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:],
                                                  skip_special_tokens=True)
    return completions


def _generate_with_peft(model, tokenizer, adapters, requests, args, device):
    """Plain PEFT, one adapter at a time and one request at a time, by PEFT's forward looped without a cache
    (``fastpeft.integration.reference_generate``): the reference the bank must equal, which PEFT's own ``generate``
    stopped being with transformers 5.24. One PeftModel cannot hold prompt-learning adapters of different types, so
    each gets its own wrapper; prompt learning leaves the base model's modules untouched, so unwrapping is
    ``get_base_model``."""
    from peft import PeftModel

    from ..integration.reference_generate import generate_without_cache

    sampling = dict(temperature=args.temperature, top_p=args.top_p) if args.do_sample else {}
    completions = [None] * len(requests)
    for name, path in adapters.items():
        peft_model = PeftModel.from_pretrained(model, path).eval()
        config = peft_model.generation_config
        pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        for i, (prompt, adapter) in enumerate(requests):
            if adapter != name:
                continue
            encoded = tokenizer([prompt], return_tensors="pt").to(device)
            generated, _ = generate_without_cache(peft_model, encoded["input_ids"], encoded["attention_mask"],
                                                  max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                                  eos_token_id=config.eos_token_id, pad_token_id=pad_id, **sampling)
            completions[i] = tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        model = peft_model.get_base_model()
    return completions


def run(args):
    adapters = _parse_adapters(args.adapter)
    prompts = _read_prompts(args)
    if args.max_new_tokens < 1:
        raise common.CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise common.CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise common.CLIError("sampling needs --temperature > 0 and 0 < --top-p <= 1")
    from ..version import installed_version

    if (args.load_in_4bit or args.load_in_8bit) and installed_version("bitsandbytes") is None:
        raise common.CLIError("--load-in-4bit/--load-in-8bit need bitsandbytes (pip install bitsandbytes)")
    adapter_configs = {name: common.read_json(os.path.join(path, "adapter_config.json"), f"adapter {name!r}")
                       for name, path in adapters.items()}
    model_dir = args.model
    if model_dir is None:
        first = next(iter(adapters))
        model_dir = adapter_configs[first].get("base_model_name_or_path")
        if not model_dir:
            raise common.CLIError(
                f"--model DIR is needed: adapter {first!r} does not name its base model (base_model_name_or_path is "
                "empty in its adapter_config.json, as when it was trained on a model built in memory, e.g. by "
                "fastpeft.MultiPrefixTrainer or get_peft_model on a model made from a config)")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise common.CLIError(f"--model DIR is needed: adapter {first!r} names base model {model_dir!r}, which is "
                                  "not a local model directory (no network access is used to fetch it)")
        flag = f"base model of adapter {first!r}"
    else:
        flag = "--model"
    common.require_model_dir(model_dir, flag)
    loading.prepare_transformers()
    from transformers import AutoConfig

    from ..integration.geometry import BaseGeometry

    geometry = BaseGeometry.of(AutoConfig.from_pretrained(model_dir))
    for name, path in adapters.items():
        # PEFT's own loader reads a pickle-only adapter (adapter_model.bin, weights only); the bank refuses it.
        _check_adapter_fits(name, path, model_dir, geometry, allow_pickle=args.engine == "peft")
    if args.engine == "bank":
        import importlib.util
        if importlib.util.find_spec("fastpeft.bank") is None:
            raise common.CLIError("fastpeft.AdapterBank is not in this install (fastpeft/bank.py is missing); "
                           "pass --engine peft to generate with plain PEFT, one adapter at a time")

    import torch
    device = common.resolve_device(args.device)
    model, tokenizer = loading.load_base(model_dir, device, common.resolve_dtype(args.dtype, device), args.load_in_4bit,
                                  args.load_in_8bit)
    model.eval()
    torch.manual_seed(args.seed)
    requests = [(prompt, name) for prompt in prompts for name in adapters]
    engine = _generate_with_bank if args.engine == "bank" else _generate_with_peft
    with torch.inference_mode():
        completions = engine(model, tokenizer, adapters, requests, args, device)

    if args.json:
        print(json.dumps([{"prompt": prompt, "adapter": name, "completion": completion}
                          for (prompt, name), completion in zip(requests, completions)], indent=2,
                         ensure_ascii=False))
        return 0
    width = max(len(name) for name in adapters)
    for index, prompt in enumerate(prompts):
        print(f"prompt {index + 1}: {prompt!r}")
        for (_, name), completion in zip(requests[index * len(adapters):(index + 1) * len(adapters)],
                                         completions[index * len(adapters):(index + 1) * len(adapters)]):
            print(f"  [{name:<{width}}] {completion!r}")
    return 0


def _check_adapter_fits(name, adapter_dir, model_dir, geometry, allow_pickle):
    """Refuse, before the model's weights load, an adapter that is not prompt learning or was trained for a base
    model of another shape: ``adapters.check_compatible`` against ``geometry`` (the ``BaseGeometry`` of the model
    in ``model_dir``)."""
    from ..adapters import check_compatible, load_prompt_adapter

    try:
        adapter = load_prompt_adapter(adapter_dir, allow_pickle=allow_pickle)
    except ValueError as exc:
        raise common.CLIError(f"adapter {name!r}: {exc}") from None
    try:
        check_compatible(adapter, geometry)
    except ValueError as exc:
        raise common.CLIError(f"adapter {name!r} was trained for another base model than {model_dir}: {exc}") from None
