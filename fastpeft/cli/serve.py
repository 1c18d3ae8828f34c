"""``fastpeft serve``: an OpenAI-compatible HTTP server for many soft-prompt adapters of one base model, with
continuous batching (``fastpeft.serve``). Without ``--model``: the built-in model of ``fastpeft.tiny``."""

import os

from . import common


def add_parser(sub):
    serve = sub.add_parser(
        "serve", help="serve many adapters over an OpenAI-compatible HTTP API (continuous batching)",
        description="Serve a base model and many PEFT soft-prompt adapters over HTTP: /v1/completions, "
                    "/v1/chat/completions (streamed or not), /v1/models. A request's 'model' names its adapter "
                    "(the base model's name: no adapter). Requests join and leave the running batch at token "
                    "boundaries, each row with its own adapter.")
    serve.add_argument("--model", metavar="DIR", help="base model directory (default: the built-in small model)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the base model's name in requests (default: the model directory's name, or "
                            "'fastpeft-tiny' for the built-in model)")
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
                       help="requests waiting for a slot before the server answers 429 (64)")
    serve.add_argument("--max-tokens-limit", type=int, default=256, metavar="N",
                       help="largest max_tokens a request may ask for (256)")
    serve.add_argument("--default-temperature", type=float, default=1.0,
                       help="temperature of requests that give none (OpenAI's default 1.0; 0 = greedy)")
    serve.add_argument("--log-requests", action="store_true", help="print an access log line per request")
    common.add_device_arguments(serve)
    serve.set_defaults(func=run)


def run(args):
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-len", args.max_len, 2),
                             ("--max-queue", args.max_queue, 0), ("--max-tokens-limit", args.max_tokens_limit, 1)):
        if value < low:
            raise common.CLIError(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.port < 65536:
        raise common.CLIError(f"--port must lie in [0, 65535], got {args.port}")
    if args.adapters is not None and not os.path.isdir(args.adapters):
        raise common.CLIError(f"--adapters {args.adapters}: no such directory")
    if args.model is not None:
        common.require_model_dir(args.model)
    common.prepare_transformers()
    from .. import tiny
    from ..serve import adapter_dirs, build_server

    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    if args.model is None:
        model, tokenizer = tiny.build_model(dtype=dtype).to(device), tiny.build_tokenizer()
        base_name = args.served_model_name or "fastpeft-tiny"
    else:
        model, tokenizer = common.load_base(args.model, device, dtype)
        base_name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    adapters = adapter_dirs(args.adapters) if args.adapters else {}
    token = args.admin_token or os.environ.get("FASTPEFT_ADMIN_TOKEN") or None
    server = build_server(model, tokenizer, adapters, base_name=base_name, host=args.host, port=args.port,
                          admin_token=token, max_batch=args.max_batch, max_len=args.max_len,
                          max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                          default_temperature=args.default_temperature, log_requests=args.log_requests)
    print(f"fastpeft serve: {base_name} + {len(adapters)} adapter(s) on {server.url}/v1 "
          f"(admin endpoints {'on' if token else 'off'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
