"""``fastpeft serve``: an OpenAI-compatible HTTP server for many soft-prompt adapters of one base model, with
continuous batching (``fastpeft.serve``). Without ``--model``: the built-in model of ``fastpeft.tiny``; ``--model t5``:
its built-in T5 (``tiny.build_t5_model``), an encoder-decoder whose requests' prompts are the encoder's input."""

import os
import re

from .. import loading
from ..serve.engine import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_PREFILL_TOKENS
from . import common

BUILTIN_T5 = "t5"
"""``--model`` value naming the built-in small T5 (a directory of that name is given as ``./t5``)."""

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "k": 2 ** 10,
               "kib": 2 ** 10, "m": 2 ** 20, "mib": 2 ** 20, "g": 2 ** 30, "gib": 2 ** 30, "t": 2 ** 40,
               "tib": 2 ** 40}


def add_parser(sub):
    serve = sub.add_parser(
        "serve", help="serve many adapters over an OpenAI-compatible HTTP API (continuous batching)",
        description="Serve a base model and many PEFT soft-prompt adapters over HTTP: /v1/completions, "
                    "/v1/chat/completions (streamed or not), /v1/models. A request's 'model' names its adapter "
                    "(the base model's name: no adapter). Requests join and leave the running batch at token "
                    "boundaries, each row with its own adapter.")
    serve.add_argument("--model", metavar="DIR", help="base model directory: a causal LM, or an encoder-decoder (T5, "
                       "MT5, BART; a request's prompt is the encoder's input) (default: the built-in small model; "
                       f"'{BUILTIN_T5}': the built-in small T5)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the base model's name in requests (default: the model directory's name, or "
                            "'fastpeft-tiny' / 'fastpeft-tiny-t5' for the built-in models)")
    serve.add_argument("--adapters", metavar="DIR", help="load every subfolder of DIR holding a PEFT adapter "
                       "(adapter_config.json), named after the subfolder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    serve.add_argument("--admin-token", metavar="TOKEN", help="bearer token of POST/DELETE /admin/adapters "
                       "(default: $FASTPEFT_ADMIN_TOKEN; unset: admin endpoints off)")
    serve.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests decoded together (16)")
    serve.add_argument("--max-len", type=int, default=512, metavar="N",
                       help="most tokens (prompt + completion) per request (512)")
    serve.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="requests waiting beyond the free batch rows before the server answers 429 (64)")
    serve.add_argument("--kv-block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N",
                       help=f"tokens per block of the KV cache pool ({DEFAULT_BLOCK_SIZE})")
    serve.add_argument("--kv-cache-tokens", type=int, metavar="N",
                       help="size of the KV cache pool in tokens of every layer (default: --max-batch x --max-len, "
                            "so that a full batch of the longest requests fits); requests wait in the queue while "
                            "the pool cannot hold every token they may write")
    serve.add_argument("--kv-cache-memory", metavar="SIZE",
                       help="size of the KV cache pool in bytes instead (keys and values of every layer), e.g. "
                            "536870912, 512MiB, 2GiB, 1.5GB")
    serve.add_argument("--max-prefill-tokens", type=int, default=DEFAULT_MAX_PREFILL_TOKENS, metavar="N",
                       help="prompt tokens prefilled per step; a longer prompt is prefilled in chunks between "
                            "decode steps of the running requests (an encoder-decoder's encoder pass is not split: "
                            f"the last prompt of a step may pass it) ({DEFAULT_MAX_PREFILL_TOKENS})")
    serve.add_argument("--max-tokens-limit", type=int, default=256, metavar="N",
                       help="largest max_tokens a request may ask for (256)")
    serve.add_argument("--default-temperature", type=float, default=1.0,
                       help="temperature of requests that give none (OpenAI's default 1.0; 0 = greedy)")
    serve.add_argument("--log-requests", action="store_true", help="print an access log line per request")
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                       help="on SIGTERM or Ctrl-C, answer new requests 503 and let those in flight finish for up to "
                            "S seconds before stopping (30); a second signal stops at once")
    serve.add_argument("--ray-replicas", type=int, metavar="N",
                       help="serve through Ray Serve with N replicas of this server (needs ray[serve] and --adapters; "
                            "joins the cluster at $RAY_ADDRESS, else starts a local one): each adapter's requests are "
                            "routed to replicas that hold it; admin endpoints are off, the adapters folder is the "
                            "source of truth")
    serve.add_argument("--ray-adapters-per-replica", type=int, default=16, metavar="N",
                       help="adapters one Ray replica holds before evicting the least recently used (16)")
    common.add_device_arguments(serve)
    serve.set_defaults(func=run)


def parse_size(text):
    """Bytes of a size written as an integer, or a number with a unit: ``KB``/``MB``/``GB``/``TB`` (powers of 1000),
    ``KiB``/``MiB``/``GiB``/``TiB`` or ``K``/``M``/``G``/``T`` (powers of 1024); case-insensitive."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _SIZE_UNITS:
        raise common.CLIError(f"--kv-cache-memory {text!r}: expected a size such as 536870912, 512MiB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def run(args):
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-len", args.max_len, 2),
                             ("--max-queue", args.max_queue, 0), ("--max-tokens-limit", args.max_tokens_limit, 1),
                             ("--drain-timeout", args.drain_timeout, 0), ("--kv-block-size", args.kv_block_size, 1),
                             ("--kv-cache-tokens", args.kv_cache_tokens, 1),
                             ("--max-prefill-tokens", args.max_prefill_tokens, 1)):
        if value is not None and value < low:
            raise common.CLIError(f"{flag} must be at least {low}, got {value}")
    if args.kv_cache_tokens is not None and args.kv_cache_memory is not None:
        raise common.CLIError("give at most one of --kv-cache-tokens and --kv-cache-memory")
    kv_cache_bytes = None if args.kv_cache_memory is None else parse_size(args.kv_cache_memory)
    if not 0 <= args.port < 65536:
        raise common.CLIError(f"--port must lie in [0, 65535], got {args.port}")
    if args.adapters is not None and not os.path.isdir(args.adapters):
        raise common.CLIError(f"--adapters {args.adapters}: no such directory")
    if args.model not in (None, BUILTIN_T5):
        common.require_model_dir(args.model)
    if args.model == BUILTIN_T5 and args.ray_replicas is not None:
        raise common.CLIError(f"--ray-replicas loads the base model from a directory; --model {BUILTIN_T5} (the "
                              "built-in T5) is served by this process only")
    loading.prepare_transformers()
    from .. import tiny
    from ..serve import adapter_dirs, build_server

    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    if args.ray_replicas is not None:  # every replica loads the model itself
        return _run_ray(args, device, kv_cache_bytes)
    if args.model is None:
        model, tokenizer = tiny.build_model(dtype=dtype).to(device), tiny.build_tokenizer()
        base_name = args.served_model_name or "fastpeft-tiny"
    elif args.model == BUILTIN_T5:
        model, tokenizer = tiny.build_t5_model(dtype=dtype).to(device), tiny.build_tokenizer()
        base_name = args.served_model_name or "fastpeft-tiny-t5"
    else:
        model, tokenizer = loading.load_base(args.model, device, dtype)
        base_name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    adapters = adapter_dirs(args.adapters) if args.adapters else {}
    token = args.admin_token or os.environ.get("FASTPEFT_ADMIN_TOKEN") or None
    try:
        server = build_server(model, tokenizer, adapters, base_name=base_name, host=args.host, port=args.port,
                              admin_token=token, max_batch=args.max_batch, max_len=args.max_len,
                              max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                              default_temperature=args.default_temperature, log_requests=args.log_requests,
                              drain_timeout=args.drain_timeout, **_engine_kv_options(args, kv_cache_bytes))
    except ImportError as error:
        raise common.CLIError(str(error)) from error
    print(f"fastpeft serve: {base_name} + {len(adapters)} adapter(s) on {server.url}/v1 "
          f"(admin endpoints {'on' if token else 'off'})", flush=True)
    try:
        server.serve_forever()  # returns after the drain that SIGTERM or Ctrl-C starts
    except KeyboardInterrupt:  # a second Ctrl-C during the drain
        pass
    finally:
        server.close()
    print("fastpeft serve: stopped", flush=True)
    return 0


def _engine_kv_options(args, kv_cache_bytes):
    """The KV pool and chunked-prefill keyword arguments of ``build_server`` / ``ray_serve.build_app``."""
    return dict(kv_block_size=args.kv_block_size, kv_cache_tokens=args.kv_cache_tokens, kv_cache_bytes=kv_cache_bytes,
                max_prefill_tokens=args.max_prefill_tokens)


def _run_ray(args, device, kv_cache_bytes):
    """``--ray-replicas``: the Ray Serve application of ``fastpeft.serve.ray_serve`` on ``--host:--port``."""
    if args.ray_replicas < 1:
        raise common.CLIError(f"--ray-replicas must be at least 1, got {args.ray_replicas}")
    if args.adapters is None:
        raise common.CLIError("--ray-replicas needs --adapters: every replica loads adapters from that folder")
    if args.model is not None and loading.is_encoder_decoder(args.model):
        raise common.CLIError(f"--ray-replicas serves causal LMs; --model {args.model} is an encoder-decoder, served "
                              "by this process only")
    if device.type != "cpu":
        raise common.CLIError("--ray-replicas runs replicas on CPU here; for GPUs build the application with "
                              "fastpeft.serve.ray_serve.build_app(..., ray_actor_options) in Python")
    try:
        import ray
        from ray import serve

        from ..serve.ray_serve import build_app
    except ImportError as error:
        raise common.CLIError(f"--ray-replicas: {error}") from error
    import time

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(os.path.abspath(args.adapters), model_dir=args.model and os.path.abspath(args.model),
                    base_name=args.served_model_name, num_replicas=args.ray_replicas,
                    max_adapters_per_replica=args.ray_adapters_per_replica, max_batch=args.max_batch,
                    max_len=args.max_len, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                    default_temperature=args.default_temperature, **_engine_kv_options(args, kv_cache_bytes))
    serve.run(app, name="fastpeft", route_prefix="/")
    print(f"fastpeft serve (Ray Serve, {args.ray_replicas} replicas) on http://{args.host}:{args.port}/v1",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
