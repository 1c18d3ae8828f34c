"""Loading and validating PEFT prompt-learning adapters (prefix tuning, prompt tuning, p-tuning).

``load_prompt_adapter`` reads an adapter directory written by PEFT's ``save_pretrained`` (or takes an in-memory
``PeftModel``) and returns the adapter exactly as PEFT saves it: its configuration and the one tensor
``prompt_embeddings``. ``check_compatible`` refuses an adapter trained for another attention layout than a base
model's (``fastpeft.integration.geometry.BaseGeometry``), and ``prefix_key_values`` / ``split_prefix`` split a prefix-tuning
prefix into per-layer K/V in PEFT's layout. Nothing here imports PEFT or transformers at import time; loading a directory needs
neither.
"""

import json
import os
from dataclasses import dataclass

import torch

PREFIX_TUNING = "PREFIX_TUNING"
PROMPT_TUNING = "PROMPT_TUNING"
P_TUNING = "P_TUNING"
PROMPT_LEARNING_TYPES = (PREFIX_TUNING, PROMPT_TUNING, P_TUNING)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
EMBEDDINGS_KEY = "prompt_embeddings"


def _plain(value):
    """PEFT configs hold str-valued enums (PeftType, TaskType); compare them as their plain string values."""
    return getattr(value, "value", value)


def plain_config(peft_config):
    """A PEFT config object as the dict ``adapter_config.json`` holds: its fields, enums as plain strings."""
    return {key: _plain(value) for key, value in peft_config.to_dict().items()}


@dataclass(frozen=True)
class PromptAdapter:
    """A PEFT prompt-learning adapter in the form PEFT saves it.

    peft_type: ``"PREFIX_TUNING"``, ``"PROMPT_TUNING"`` or ``"P_TUNING"``.
    config: the adapter configuration (``adapter_config.json`` as a dict, enums as plain strings).
    embeddings: float32 CPU tensor ``prompt_embeddings``. Prefix tuning: ``[P, num_layers * 2 * Hkv * head_dim]``
        (with ``prefix_projection`` this is the projection MLP's output, never its weights); prompt tuning and
        p-tuning: ``[P * num_transformer_submodules, hidden_size]`` (p-tuning: the prompt encoder's output).
    source: where it came from, for error messages.
    """

    peft_type: str
    config: dict
    embeddings: torch.Tensor
    source: str

    @property
    def num_virtual_tokens(self):
        return int(self.config["num_virtual_tokens"])

    @property
    def task_type(self):
        return self.config.get("task_type")


def load_prompt_adapter(source, allow_pickle=False, adapter_name=None):
    """Load a PEFT prompt-learning adapter.

    Arguments:
        source: a directory written by ``PeftModel.save_pretrained`` (``adapter_config.json`` plus
            ``adapter_model.safetensors``), or an in-memory ``PeftModel``. For a ``PeftModel`` the prompt encoder
            is evaluated once, in eval mode, exactly as PEFT does when saving (a prefix with projection becomes the
            MLP's output ``[P, num_layers * 2 * Hkv * head_dim]``).
        allow_pickle: also accept a pickle checkpoint ``adapter_model.bin`` when the directory has no safetensors
            file (loaded with ``torch.load(weights_only=True)``). Off by default: pickle files can run code.
        adapter_name: which adapter of a ``PeftModel`` to take; default its active adapter.

    Returns a ``PromptAdapter``. Raises ``ValueError`` for a directory without a config or weights, a pickle-only
    checkpoint without ``allow_pickle=True``, an adapter that is not prompt learning, or weights of the wrong shape.
    """
    if isinstance(source, (str, os.PathLike)):
        if adapter_name is not None:
            raise ValueError("adapter_name selects an adapter of an in-memory PeftModel; a directory holds one")
        config, embeddings = _read_directory(os.fspath(source), allow_pickle)
        origin = os.fspath(source)
    elif hasattr(source, "peft_config") and hasattr(source, "get_prompt_embedding_to_save"):
        config, embeddings = _read_peft_model(source, adapter_name)
        origin = f"PeftModel adapter {adapter_name or source.active_adapter!r}"
    else:
        raise ValueError(f"an adapter must be a PEFT adapter directory or a PeftModel, got {type(source).__name__}")

    if not isinstance(config.get("num_virtual_tokens"), int) or config["num_virtual_tokens"] <= 0:
        raise ValueError(f"{origin}: num_virtual_tokens must be a positive integer, "
                         f"got {config.get('num_virtual_tokens')!r}")
    if embeddings.dim() != 2 or not embeddings.dtype.is_floating_point:
        raise ValueError(f"{origin}: {EMBEDDINGS_KEY} must be a 2-D floating-point tensor, got "
                         f"{embeddings.dtype} of shape {tuple(embeddings.shape)}")
    return PromptAdapter(config["peft_type"], config, embeddings.detach().to("cpu", torch.float32), origin)


def _check_prompt_learning(config, origin):
    """Refuse a non-prompt-learning adapter by its peft_type, before any weights are read."""
    peft_type = config.get("peft_type")
    if peft_type not in PROMPT_LEARNING_TYPES:
        raise ValueError(f"{origin}: peft_type {peft_type!r} is not prompt learning; supported: "
                         f"{', '.join(PROMPT_LEARNING_TYPES)}")


def _read_directory(path, allow_pickle):
    if not os.path.isdir(path):
        raise ValueError(f"adapter directory {path!r} does not exist")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} has no {CONFIG_FILE}; is it a PEFT adapter directory?")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path!r} is not valid JSON ({exc}); the adapter directory is damaged") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path!r} does not hold a JSON object; the adapter directory is damaged")
    _check_prompt_learning(config, repr(path))

    safetensors_path = os.path.join(path, SAFETENSORS_FILE)
    pickle_path = os.path.join(path, PICKLE_FILE)
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        try:
            state = load_file(safetensors_path, device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
            raise ValueError(f"{safetensors_path!r} cannot be read as safetensors ({exc.__class__.__name__}: "
                             f"{exc}); the adapter file is damaged or truncated") from None
    elif os.path.isfile(pickle_path):
        if not allow_pickle:
            raise ValueError(f"{path!r} holds only the pickle checkpoint {PICKLE_FILE} and no {SAFETENSORS_FILE}; "
                             "pickle files can execute code, so they are refused unless you pass allow_pickle=True "
                             "(or re-save the adapter with safe_serialization=True)")
        try:
            state = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError for a damaged or truncated file
            raise ValueError(f"{pickle_path!r} cannot be loaded ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); the adapter file is damaged") from None
    else:
        raise ValueError(f"{path!r} has no adapter weights ({SAFETENSORS_FILE})")

    if EMBEDDINGS_KEY not in state:
        raise ValueError(f"{path!r}: the adapter weights hold no {EMBEDDINGS_KEY!r} tensor "
                         f"(keys: {sorted(state)[:5]}); is it a prompt-learning adapter?")
    return config, state[EMBEDDINGS_KEY]


def _read_peft_model(peft_model, adapter_name):
    name = adapter_name if adapter_name is not None else peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"the PeftModel has no adapter {name!r} (it has {sorted(peft_model.peft_config)})")
    peft_config = peft_model.peft_config[name]
    config = plain_config(peft_config)
    _check_prompt_learning(config, f"PeftModel adapter {name!r}")
    encoder = peft_model.prompt_encoder[name]
    if peft_config.inference_mode:
        # Loaded for inference (PeftModel.from_pretrained): the embedding holds what was saved, i.e. the encoder's
        # output, and a projection prefix has no MLP left (PEFT's get_prompt reads the embedding directly, while its
        # get_prompt_embedding_to_save would call the missing MLP).
        return config, encoder.embedding.weight.detach()
    was_training = encoder.training
    encoder.eval()  # an LSTM p-tuning encoder has dropout; what is served must be deterministic, as when saved
    try:
        with torch.no_grad():
            embeddings = peft_model.get_prompt_embedding_to_save(name)
    finally:
        encoder.train(was_training)
    return config, embeddings


def check_compatible(adapter, geometry, task_type="CAUSAL_LM", encoder_decoder=False):
    """Raise ``ValueError`` naming every difference between ``adapter`` (a ``PromptAdapter``) and ``geometry``
    (``BaseGeometry`` of the base model): task type, layers, KV heads, head size, hidden size, weight shape. A base
    model whose layers differ in KV heads or head size is refused (``BaseGeometry.require_uniform``).

    ``encoder_decoder``: the base model is an encoder-decoder, whose ``geometry`` is what PEFT sizes adapters by (the
    encoder's layers and heads), and whose adapters PEFT gives ``num_transformer_submodules`` 2 by default (a prompt's
    embedding then holds ``P * submodules`` rows, of which the encoder reads the first P; how a prefix's submodules
    and the decoder must fit is ``integration.peft.checks.check_encoder_decoder_prefix``'s to say)."""
    geometry.require_uniform(f"adapter {adapter.source} ({adapter.peft_type})")
    config, P = adapter.config, adapter.num_virtual_tokens
    problems = []
    if task_type is not None and adapter.task_type != task_type:
        problems.append(f"task_type {adapter.task_type!r} (expected {task_type!r})")
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1 and not encoder_decoder:
        problems.append(f"num_transformer_submodules {submodules} (a decoder-only model has 1)")

    def compare(what, adapter_value, base_value):
        if adapter_value is not None and adapter_value != base_value:
            problems.append(f"{what}: adapter {adapter_value}, base model {base_value}")

    compare("layers", config.get("num_layers"), geometry.num_layers)
    token_dim, heads = config.get("token_dim"), config.get("num_attention_heads")
    if adapter.peft_type == PREFIX_TUNING:
        # PEFT sizes a prefix per KV head: token_dim = Hkv * head_dim, num_attention_heads = Hkv.
        compare("KV heads", heads, geometry.num_kv_heads)
        if token_dim is not None and heads:
            if token_dim % heads:
                problems.append(f"token_dim {token_dim} is not a multiple of num_attention_heads {heads}")
            else:
                compare("head size", token_dim // heads, geometry.head_dim)
        expected_shape = (P, geometry.num_layers * 2 * geometry.num_kv_heads * geometry.head_dim)
    else:
        compare("hidden size", token_dim, geometry.hidden_size)
        compare("attention heads", heads, geometry.num_attention_heads)
        expected_shape = (P * submodules, geometry.hidden_size)
    if not problems and tuple(adapter.embeddings.shape) != expected_shape:
        problems.append(f"{EMBEDDINGS_KEY} shape {tuple(adapter.embeddings.shape)} (expected {expected_shape} "
                        f"for {P} virtual tokens)")
    if problems:
        raise ValueError(f"adapter {adapter.source} ({adapter.peft_type}) does not fit this base model: "
                         + "; ".join(problems))


def prefix_key_values(adapter, geometry):
    """Per-layer prefix K/V of a prefix-tuning adapter, in PEFT's layout: the embeddings viewed as
    ``[P, 2 * num_layers, Hkv, head_dim]``, slot ``2 i`` is layer i's keys and ``2 i + 1`` its values (never rotated).

    Returns ``(keys, values)``, each a list of ``num_layers`` float32 tensors ``[Hkv, P, head_dim]``.
    """
    if adapter.peft_type != PREFIX_TUNING:
        raise ValueError(f"prefix_key_values needs a PREFIX_TUNING adapter, got {adapter.peft_type}")
    check_compatible(adapter, geometry, task_type=None)
    keys, values = split_prefix(adapter.embeddings, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    return list(keys), list(values)


def encoder_decoder_prefix_layers(num_layers, decoder_layers):
    """Which of a prefix-tuning adapter's ``num_layers`` per-layer K/V (``split_prefix``) each of an encoder-decoder's
    ``decoder_layers`` self-attention layers reads in PEFT: decoder layer i reads layer ``2i mod num_layers``.

    PEFT's ``get_prompt`` (``num_transformer_submodules=2``) views the prefix as ``[P, 2 NL, H, D]``, concatenates
    that slot axis with itself (``4 NL`` slots) and splits it in groups of 4, each decoder layer's (self K, self V,
    cross K, cross V) of an ``EncoderDecoderCache``, whose cross-attention half it then empties. Decoder layer i thus
    reads slots ``4i mod 2NL`` and ``4i+1 mod 2NL``: layer ``2i mod NL``'s keys and values (with NL=2 both decoder
    layers read layer 0's, and layer 1's half of the prefix is never used). Returns the list of layer indices."""
    return [2 * i % num_layers for i in range(decoder_layers)]


def split_prefix(flat, num_layers, num_kv_heads, head_dim):
    """Per-layer keys and values of prefix-tuning prefixes in PEFT's layout.

    flat: one prefix ``[P, num_layers * 2 * Hkv * head_dim]`` (what PEFT's prompt encoder outputs and saves) or a
        table of them ``[T, P, num_layers * 2 * Hkv * head_dim]``. Each token's vector is viewed as
        ``[2 * num_layers, Hkv, head_dim]``: slot ``2 i`` holds layer i's key, ``2 i + 1`` its value.

    Returns ``(keys, values)``: tuples of ``num_layers`` tensors ``[Hkv, P, head_dim]`` (``[T, Hkv, P, head_dim]``
    for a table), views of one contiguous ``[2 * num_layers, (T,) Hkv, P, head_dim]`` copy, so that every layer's
    tensor is contiguous. Differentiable.
    """
    lead = flat.dim() - 2  # 0 for one prefix, 1 for a table
    P = flat.shape[-2]
    slots = flat.reshape(*flat.shape[:lead], P, 2 * num_layers, num_kv_heads, head_dim)
    # [(T,) P, 2NL, Hkv, D] -> [2NL, (T,) Hkv, P, D]
    slots = slots.permute(lead + 1, *range(lead), lead + 2, lead, lead + 3).contiguous()
    return slots[0::2].unbind(0), slots[1::2].unbind(0)
