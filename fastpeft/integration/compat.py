"""Every lookup of transformers / PEFT internals whose name or behaviour changes between releases, in one place.

fastpeft reaches into transformers and PEFT at a few seams: the keyword a model takes its KV cache under, where a
model output and a generation step's inputs keep that cache, the position ids a generation step carries, the
hook that adds keyword arguments to every generation step, the activation-checkpointing switch, configuration
attributes that differ per layer (transformers' heterogeneous configurations, 5.15 on), which layers reuse another
layer's keys and values (Gemma 4), whether a model class routes attention through the attention interface (and hands
it keyword arguments), how a backbone numbers positions after a cache, where an encoder-decoder's decoder takes its
positions from, and PEFT's flag for a disabled adapter. (The one other seam, the mask function's signature, needs no lookup: transformers calls it
by keyword, with ``q_length``/``q_offset`` in 5.x and ``cache_position`` before, and ``fastpeft_mask`` accepts
both and needs neither.) Releases rename these (transformers 5.24 passes the cache as ``cache``; ``past_key_values``
is deprecated, removal announced for 5.40; 5.2x renamed ``gradient_checkpointing_*`` to
``activation_checkpointing_*``), and a lookup under the old name does not fail, it quietly finds nothing. So each
seam is looked up here, by feature rather than by version number, and the rest of fastpeft asks this module.

The versions the test suite passes on are ``TESTED_VERSIONS``; ``warn_if_untested`` warns once when an installed
transformers or PEFT is newer than the newest tested (older than the oldest is refused by the package metadata).
"""

import contextlib
import functools
import inspect
import re
import weakref

import torch

from ..ops import environment
from ..version import installed_version

# (oldest, newest) release the whole test suite passes on; pyproject's ranges start at the oldest. Update both
# with `.ci/run-latest` when a new release passes.
TESTED_VERSIONS = {"transformers": ("5.17.0", "5.25.0"), "peft": ("0.21.0", "0.21.2")}

# The KV cache's keyword, newest name first: transformers >= 5.24 "cache", earlier releases "past_key_values".
_CACHE_NAMES = ("cache", "past_key_values")


# ----- the KV cache ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _forward_parameters(forward_function):
    try:
        return frozenset(inspect.signature(forward_function).parameters)
    except (TypeError, ValueError):  # builtins or C callables without a signature
        return frozenset()


def takes_argument(function, name):
    """Whether ``function``'s signature names the parameter ``name`` (``**kwargs`` does not count)."""
    return name in _forward_parameters(function)


def cache_keyword(model):
    """The keyword ``model.forward`` takes its KV cache under: ``"cache"`` (transformers >= 5.24) or
    ``"past_key_values"`` (earlier releases, and models that were not migrated), or None when it takes neither
    (BERT's sequence classifier on 5.24)."""
    parameters = _forward_parameters(getattr(type(model), "forward", model.forward))
    for name in _CACHE_NAMES:
        if name in parameters:
            return name
    return None


def cache_kwargs(model, cache):
    """``{keyword: cache}`` for calling ``model`` with ``cache`` under the keyword it takes (``{}`` for None).
    Passing the deprecated name would log transformers' deprecation warning on every call. A cache that fastpeft's
    attention function reads itself adds the keyword arguments it needs there (its ``fastpeft_attention_kwargs``:
    ``paged_cache.PagedKVCache`` under ``fastpeft_paged``), since transformers hands attention functions the forward's
    extra keyword arguments but not the cache."""
    if cache is None:
        return {}
    name = cache_keyword(model)
    if name is None:
        raise ValueError(f"{type(model).__name__}.forward takes no KV cache (neither 'cache' nor 'past_key_values')")
    return {name: cache, **getattr(cache, "fastpeft_attention_kwargs", {})}


def cache_in(mapping):
    """The KV cache in a forward's keyword arguments or a generation step's model inputs (a dict), under either
    name; None when there is none."""
    for name in _CACHE_NAMES:
        cache = mapping.get(name)
        if cache is not None:
            return cache
    return None


def cache_of(output):
    """The KV cache a model output returns, read without transformers' deprecation warning (5.24 keeps it in the
    ``cache`` field and warns on ``past_key_values``); None when the output holds none."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    for name in _CACHE_NAMES:
        if name in fields:
            return getattr(output, name)
    return None


def cache_length(cache):
    """Tokens held by a transformers ``Cache`` (0 for None)."""
    return cache.get_seq_length() if cache is not None else 0


def cache_layer_key_values(cache, layer):
    """``(keys, values)`` ``[B, Hkv, S, D]`` of one layer of a transformers ``DynamicCache``: ``cache.layers[i]``
    in transformers 5 (4.x kept ``key_cache`` / ``value_cache`` lists)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


# ----- generation ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def generation_step_hook(model, transform):
    """For the duration of the block, every generation step's model inputs pass through ``transform(inputs)``
    (a dict, changed in place or returned anew) after ``model.prepare_inputs_for_generation`` built them.

    Installed as an instance attribute of ``model`` (the way PEFT's own ``generate`` hooks the backbone) and removed
    afterwards, restoring an instance attribute that was there before."""
    had_instance_attribute = "prepare_inputs_for_generation" in vars(model)
    prepare_inputs = model.prepare_inputs_for_generation

    # functools.wraps keeps the signature: transformers inspects it to validate generate's model kwargs.
    @functools.wraps(prepare_inputs)
    def prepare_inputs_then_transform(*args, **kwargs):
        return transform(prepare_inputs(*args, **kwargs))

    model.prepare_inputs_for_generation = prepare_inputs_then_transform
    try:
        yield
    finally:
        if had_instance_attribute:
            model.prepare_inputs_for_generation = prepare_inputs
        else:
            del model.prepare_inputs_for_generation


def step_new_tokens(model_inputs):
    """The tokens a generation step feeds the model: its ``input_ids`` ``[B, n]`` or, at a prefill from
    embeddings, its ``inputs_embeds`` ``[B, n, hidden]``."""
    new_tokens = model_inputs.get("input_ids")
    return new_tokens if new_tokens is not None else model_inputs["inputs_embeds"]


# ----- activation checkpointing ----------------------------------------------------------------------------------


def checkpointing_names(model):
    """``(enable method, its kwargs keyword)`` of the installed transformers: ``activation_checkpointing_*`` since
    5.2x, ``gradient_checkpointing_*`` before (now a deprecated alias)."""
    if hasattr(model, "activation_checkpointing_enable"):
        return "activation_checkpointing_enable", "activation_checkpointing_kwargs"
    return "gradient_checkpointing_enable", "gradient_checkpointing_kwargs"


def checkpoint_function(module):
    """The function a checkpointed transformers module recomputes its forward with, or None when the module is not
    checkpointed. transformers stores ``functools.partial(checkpoint, **kwargs)`` as ``_gradient_checkpointing_func``
    under both method names."""
    if not getattr(module, "gradient_checkpointing", False):
        return None
    return getattr(module, "_gradient_checkpointing_func", None)


# ----- configurations ----------------------------------------------------------------------------------------------


class ConfigReadError(ValueError):
    """A model configuration attribute fastpeft needs cannot be read as one value (``config_attribute``).
    ``attribute`` names it; ``per_layer`` says whether the reason is that it differs between layers."""

    def __init__(self, message, attribute, per_layer):
        super().__init__(message)
        self.attribute = attribute
        self.per_layer = per_layer


def _per_layer_attribute_error():
    """transformers' exception for reading a per-layer attribute off a heterogeneous configuration (5.15 on), or
    ``()`` (matches nothing) where the release has none."""
    try:
        from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError
    except ImportError:
        return ()
    return AmbiguousGlobalPerLayerAttributeError


def config_attribute(config, name, default=None):
    """``config.<name>``, or ``default`` where the configuration has no such attribute.

    transformers' heterogeneous configurations (per-layer overrides: Gemma 4's sliding and full-attention layers have
    different ``head_dim``) raise their own ``AmbiguousGlobalPerLayerAttributeError`` for an attribute that differs
    between layers: a RuntimeError, which ``getattr(config, name, default)`` does not catch. That, and any other
    exception a configuration raises for an attribute, becomes ``ConfigReadError`` (a ValueError) naming the attribute
    (with its per-layer values where it differs per layer), so that callers refuse by name."""
    try:
        return getattr(config, name, default)
    except Exception as error:  # AttributeError is getattr's default already; this is anything else
        model_type = getattr(config, "model_type", None)
        if isinstance(error, _per_layer_attribute_error()):
            values = layer_attribute_values(config, name)
            raise ConfigReadError(f"config.{name} of {model_type!r} differs between layers (per layer: {values})",
                                  name, per_layer=True) from None
        raise ConfigReadError(f"config.{name} of {model_type!r} cannot be read ({type(error).__name__}: {error})",
                              name, per_layer=False) from None


# layer_attribute_values' answers: (id(config), name) -> (weak reference to config, _config_fingerprint, values).
_LAYER_VALUES = {}
_LAYER_VALUES_LIMIT = 256
_SCALAR_TYPES = frozenset((int, float, str, bool, type(None)))


def _config_fingerprint(config):
    """What a configuration's per-layer view depends on, read without its attribute hooks: every attribute's value
    where it is a scalar, its object's identity otherwise (transformers replaces its per-layer overrides, rather than
    mutating them, when they are set). ~30 us for Gemma 4's, against ~10 ms for reading 35 layers' views."""
    return tuple(item if type(item[1]) in _SCALAR_TYPES else (item[0], id(item[1])) for item in vars(config).items())


def layer_attribute_values(config, name, default=None):
    """``name`` of each layer's configuration (transformers' ``config.per_layer_config`` view, which applies the
    per-layer overrides), as a tuple; None where the configuration offers no per-layer view or it cannot be read.

    The view copies the whole configuration per layer: answers are kept per configuration object and recomputed when
    any of its attributes changed (PEFT reads them at every forward, and users change them between forwards)."""
    key, fingerprint = (id(config), name), _config_fingerprint(config)
    known = _LAYER_VALUES.get(key)
    if known is not None and known[0]() is config and known[1] == fingerprint:
        return known[2]
    try:
        values = tuple(getattr(layer, name, default) for layer in config.per_layer_config)
    except Exception:  # noqa: BLE001 (no per-layer view is an answer here, not a failure)
        values = None
    if len(_LAYER_VALUES) >= _LAYER_VALUES_LIMIT:
        _LAYER_VALUES.clear()
    _LAYER_VALUES[key] = (weakref.ref(config), fingerprint, values)
    return values


def kv_sharing_sources(model):
    """``{layer_idx: source layer_idx}`` for the attention layers of ``model`` that reuse another layer's keys and
    values instead of computing their own, ``{}`` for a model without KV sharing.

    Gemma 4's last ``num_kv_shared_layers`` layers have no K/V projections: each attends over the K/V that the last
    non-shared layer of its ``layer_type`` computed in the same forward, that layer's cache (and so PEFT's prefix in
    it) included. transformers marks them on the attention modules (5.17 to 5.25): ``is_kv_shared_layer`` on the
    consumers, ``store_full_length_kv`` on the providers, ``layer_type`` on both. Read from the modules, which keep
    what the model was built with, not from the configuration, which a user may change afterwards. Raises
    ``ValueError`` when a sharing layer has no single provider."""
    modules = [module for module in model.modules()
               if hasattr(module, "is_kv_shared_layer") and hasattr(module, "layer_idx")]
    providers = {}
    for module in modules:
        if getattr(module, "store_full_length_kv", False) and not module.is_kv_shared_layer:
            providers.setdefault(getattr(module, "layer_type", None), []).append(module.layer_idx)
    sources = {}
    for module in modules:
        if module.is_kv_shared_layer:
            layer_type = getattr(module, "layer_type", None)
            candidates = providers.get(layer_type, [])
            if len(candidates) != 1:
                raise ValueError(f"{type(model).__name__}'s attention layer {module.layer_idx} reuses another layer's "
                                 f"keys and values ({layer_type}), but fastpeft finds {len(candidates)} layers that "
                                 "provide them (store_full_length_kv); it cannot tell which prefix that layer sees")
            sources[module.layer_idx] = candidates[0]
    return sources


# ----- attention interface and positions -------------------------------------------------------------------------


def is_pretrained_model(module):
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def passes_kwargs_to_attention(model):
    """Whether ``model``'s class (or ``model``, a class) declares ``_supports_attention_backend``: transformers 5.x
    sets it on model classes whose attention goes through the attention interface (``ALL_ATTENTION_FUNCTIONS``)
    *and* which hand the forward's keyword arguments down to every attention call. fastpeft's prefix tuning needs
    both (the prefix travels as the ``fastpeft_prefix`` keyword). Classes with hand-written attention leave it False
    (GPT-J on 5.17, Falcon up to 5.24, DeBERTa), and so do some that use the interface without declaring it (BART, T5,
    Falcon on 5.25). A class may declare it while a layer drops the keyword anyway: every call also checks that each
    layer's attention took its prefix (``attention.PrefixSpec.check_consumed``)."""
    cls = model if isinstance(model, type) else type(model)
    return bool(getattr(cls, "_supports_attention_backend", False))


def uses_attention_interface(model):
    """Whether ``model``'s class computes its attention through the attention interface, so that
    ``set_attn_implementation("fastpeft")`` reaches every attention call: ``passes_kwargs_to_attention``, or
    transformers' own test for dynamic switching, ``_can_set_attn_implementation`` (its module's attention classes
    call ``ALL_ATTENTION_FUNCTIONS.get_interface``: BART, T5; False for hand-written attention)."""
    cls = model if isinstance(model, type) else type(model)
    if passes_kwargs_to_attention(cls):
        return True
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    return bool(can_set()) if callable(can_set) else False


def set_attn_implementation(model, implementation):
    """``model.set_attn_implementation(implementation)``, reaching every sub-model. transformers 5.17 passes it on only
    to sub-models whose config is of another class, so T5's encoder and decoder stacks (each with its own copy of the
    T5Config) keep their previous implementation there; 5.2x passes it on by config identity. Any sub-model still on
    another implementation afterwards is switched itself."""
    model.set_attn_implementation(implementation)
    for module in model.modules():
        if is_pretrained_model(module) and module.config._attn_implementation != implementation:
            module.set_attn_implementation(implementation)


def position_scheme(model):
    """How ``model`` numbers its tokens when it gets no ``position_ids`` and a KV cache precedes them (which is how
    PEFT's prefix tuning hands over its prefix): ``("mask", None)`` for learned positions counted over the attention
    mask (OPT's ``embed_positions(attention_mask, ...)``: pad-aware), ``("input_ids", padding_idx)`` for positions
    counted over the non-pad input ids from ``padding_idx + 1`` (RoBERTa-style embeddings), or ``("cache", None)``
    for ``cached tokens + arange(L)`` (everything else: Llama, GPT-2, BERT, ...)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "embed_positions" and "attention_mask" in _forward_parameters(
                type(module).forward):
            return "mask", None
        if hasattr(module, "create_position_ids_from_input_ids") and getattr(module, "padding_idx", None) is not None:
            return "input_ids", module.padding_idx
    return "cache", None


def decoder_position_embedding(model):
    """The module an encoder-decoder's decoder takes its absolute positions from, or None: BART's (and its kin's)
    ``decoder.embed_positions``, which the decoder calls as ``(input_ids, cache length, position_ids=cache length +
    arange(L))`` (the cache length is ``past_key_values_length`` up to 5.17, ``cache_length`` in 5.24). T5's decoder
    has none: it numbers positions in its relative attention bias."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return getattr(decoder, "embed_positions", None) if decoder is not None else None


def decoder_relative_bias(model):
    """The attention module whose relative position bias an encoder-decoder's decoder numbers its positions in, or
    None: T5's (and MT5's) first decoder self-attention, the one layer with ``has_relative_attention_bias``, whose
    ``compute_bias(query_length, key_length, device=..., past_seen_tokens=...)`` gives the bias every decoder
    self-attention layer then shares."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None:
        return None
    modules = [module for module in decoder.modules()
               if getattr(module, "has_relative_attention_bias", False) and getattr(module, "is_causal", False)
               and callable(getattr(module, "compute_bias", None))]
    return modules[0] if len(modules) == 1 else None


@contextlib.contextmanager
def decoder_positions_shifted(model, offset):
    """For the duration of the block, ``model``'s decoder numbers its tokens ``offset`` further on, as it does when
    a KV cache of ``offset`` more tokens precedes them (PEFT's prefix tuning hands its prefix to an encoder-decoder
    as such a cache, and the decoders take no position ids to say it without one).

    ``offset`` is an int, or a ``[B]`` integer tensor with each row's own offset (``AdapterBank``: each row's prefix
    has its own length); a call with ``k * B`` rows (beams, return sequences: transformers puts row b's copies at
    ``b*k .. b*k+k-1``) gives each copy its row's offset. Per-row offsets need the decoder's ``input_ids`` in the
    call (the rows are counted from them).

    Forward hooks on ``decoder_position_embedding(model)``: a pre-hook adds the offset to the ``position_ids`` the
    decoder computed (or to the cache length, where it passes none); per-row offsets become ``[B, L]`` position ids
    and a forward hook gives the embeddings the decoder's ``[B, L, hidden]`` shape. Removed when the block ends, so a
    model outside the block, ``fastpeft.restore`` and a deep copy see no trace of them. Not for two threads running
    one model at once (neither is PEFT's own generate, which sets instance attributes for its duration). A decoder
    that numbers its positions in a relative attention bias (T5, ``decoder_relative_bias``) needs nothing here: its
    keys' bias does not move with a shift of queries and keys alike, and the prefix's columns are computed in
    attention (``attention.DecoderSelfAttentionPrefix.relative_bias``). Raises ValueError when the decoder has neither
    or calls its position embedding in a way this does not know."""
    module = decoder_position_embedding(model)
    if module is None:
        if decoder_relative_bias(model) is None:
            raise ValueError(f"{type(model).__name__}'s decoder has no position embedding (decoder.embed_positions) "
                             "or relative attention bias that fastpeft can shift by the prefix length, as PEFT's "
                             "cache does")
        yield
        return

    def unknown_call():
        return ValueError(f"{type(module).__name__} was called without position ids or a cache length in the places "
                          "fastpeft shifts (this transformers release calls the decoder's position embedding "
                          "differently)")

    def shift(module, args, kwargs):
        if kwargs.get("position_ids") is not None:
            return args, {**kwargs, "position_ids": kwargs["position_ids"] + offset}
        if len(args) > 2 and args[2] is not None:
            return (*args[:2], args[2] + offset, *args[3:]), kwargs
        if len(args) > 1 and isinstance(args[1], int):
            return (args[0], args[1] + offset, *args[2:]), kwargs
        raise unknown_call()

    rows_of_call = []  # (B, L) of the call in flight, for the per-row forward hook

    def shift_rows(module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(f"per-row decoder position offsets need the decoder's input_ids; {type(model).__name__}"
                             "'s decoder was called without them (decoder_inputs_embeds)")
        rows, length = input_ids.shape[:2]
        if kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"]
        elif len(args) > 2 and args[2] is not None:
            positions = args[2]
        elif len(args) > 1 and isinstance(args[1], int):
            positions = torch.arange(args[1], args[1] + length, device=input_ids.device)
        else:
            raise unknown_call()
        row_offsets = offset.to(input_ids.device).repeat_interleave(rows // offset.shape[0])
        rows_of_call.append((rows, length))
        return args[:2], {**kwargs, "position_ids": positions.reshape(-1, length) + row_offsets[:, None]}

    def row_shaped(module, args, output):
        rows, length = rows_of_call.pop()
        return output.reshape(rows, length, output.shape[-1])

    if isinstance(offset, torch.Tensor):
        handles = [module.register_forward_pre_hook(shift_rows, with_kwargs=True),
                   module.register_forward_hook(row_shaped)]
    else:
        handles = [module.register_forward_pre_hook(shift, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----- PEFT ------------------------------------------------------------------------------------------------------


def adapters_disabled(peft_model):
    """True inside ``with peft_model.disable_adapter():`` (PEFT's ``_adapters_disabled`` flag)."""
    return bool(getattr(peft_model, "_adapters_disabled", False))


# ----- versions ----------------------------------------------------------------------------------------------------


def _release(version):
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``: the numeric release, pre/post/dev tags and local labels dropped."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d*", part).group()
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:  # "0rc1": the tag ends the release
            break
    return tuple(numbers)


def version_status(package):
    """``(installed version or None, "tested" | "newer than tested" | "older than tested" | "not installed")``."""
    installed = installed_version(package)
    if installed is None:
        return None, "not installed"
    oldest, newest = TESTED_VERSIONS[package]
    if _release(installed) > _release(newest):
        return installed, "newer than tested"
    if _release(installed) < _release(oldest):
        return installed, "older than tested"
    return installed, "tested"


def warn_if_untested(user):
    """Warn once per process when the installed transformers or PEFT is newer than the newest tested release:
    fastpeft reads internals that releases rename (this module), and a rename found by no test can give wrong
    numbers. ``user`` names the entry point in the message."""
    for package, (oldest, newest) in TESTED_VERSIONS.items():
        installed, status = version_status(package)
        if status == "newer than tested":
            environment.warn_once(f"{package} {installed} is newer than the newest release fastpeft was tested with "
                               f"({newest}; tested {oldest} to {newest}). {user} should work, but check its outputs "
                               "against plain PEFT (`bash .ci/run-latest` runs the suite on the newest releases), "
                               "or install the tested set: `pip install -c constraints.txt ...` (see the README)")
