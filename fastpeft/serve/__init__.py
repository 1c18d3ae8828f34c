"""``fastpeft serve``: many soft-prompt tenants behind an OpenAI-compatible HTTP API, continuously batched.

``build_server`` puts the pieces together for a loaded base model: an ``AdapterBank`` holding every adapter of a
folder, the continuous-batching ``Engine`` (``engine.py``), its asyncio client (``engine_client.py``), the FastAPI
app (``app.py``, models in ``protocol.py``, ``/metrics`` in ``metrics.py``) and uvicorn (``server.py``). The model is
touched by the engine's thread alone. The base model is a causal LM or an encoder-decoder (T5, MT5, BART: a request's
prompt is the encoder's input; ``model_kinds.py`` holds what differs). The HTTP parts need the ``serve`` extra (``pip
install "fastpeft[serve]"``): they are imported when ``build_server`` runs, so ``Engine`` works without them.
"""

import os

from .engine import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_PREFILL_TOKENS, Engine, GenerationRequest, KVUsage, QueueFull

__all__ = ["Engine", "GenerationRequest", "KVUsage", "QueueFull", "build_server", "adapter_dirs"]


def adapter_dirs(folder):
    """``{name: path}`` for every subfolder of ``folder`` that holds an ``adapter_config.json`` (sorted by name)."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            found[name] = path
    return found


def build_server(model, tokenizer, adapters=None, base_name="base", host="127.0.0.1", port=0, admin_token=None,
                 max_batch=16, max_len=512, max_queue=64, max_tokens_limit=256, default_max_tokens=16,
                 default_temperature=1.0, log_requests=False, drain_timeout=30.0, kv_block_size=DEFAULT_BLOCK_SIZE,
                 kv_cache_tokens=None, kv_cache_bytes=None, max_prefill_tokens=DEFAULT_MAX_PREFILL_TOKENS):
    """A started engine and a ``server.Server`` bound to ``host:port`` (0: an ephemeral port), not yet serving:
    call ``server.start()`` (background thread) or ``server.serve_forever()``; ``server.close()`` stops both.

    ``adapters``: ``{name: PEFT adapter directory or PeftModel}`` loaded into a new ``AdapterBank`` on ``model`` (a
    causal LM, or an encoder-decoder: T5, MT5, BART, whose prompts are the encoder's input).
    ``max_batch``, ``max_len``, ``max_queue``, ``kv_block_size``, ``kv_cache_tokens`` / ``kv_cache_bytes`` and
    ``max_prefill_tokens``: the ``Engine``'s (``block_size`` is ``kv_block_size``).
    """
    from ..bank import AdapterBank

    try:
        from .app import ServeConfig, create_app
        from .engine_client import EngineClient
        from .server import Server
    except ImportError as error:
        raise ImportError(f'fastpeft serve needs the serve extra: pip install "fastpeft[serve]" ({error})') from error

    bank = AdapterBank(model)
    for name, source in (adapters or {}).items():
        if name == base_name:
            raise ValueError(f"adapter name {name!r} is the base model's served name")
        bank.add(name, source)
    engine = Engine(bank, max_batch=max_batch, max_len=max_len, max_queue=max_queue, block_size=kv_block_size,
                    kv_cache_tokens=kv_cache_tokens, kv_cache_bytes=kv_cache_bytes,
                    max_prefill_tokens=max_prefill_tokens)
    client = EngineClient(engine.start())
    config = ServeConfig(tokenizer, base_name, admin_token=admin_token, max_tokens_limit=max_tokens_limit,
                         default_max_tokens=default_max_tokens, default_temperature=default_temperature,
                         max_choices=max_batch, max_request_choices=max_batch + max_queue,
                         scores_prompt=engine.scores_prompt)
    return Server(create_app(config, client), client, host=host, port=port, log_requests=log_requests,
                  drain_timeout=drain_timeout)
