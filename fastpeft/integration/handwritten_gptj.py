"""GPT-J on transformers releases where its attention is hand-written (5.17 among them; from 5.2x GPT-J goes through
the attention interface and ``set_attn_implementation("fastpeft")`` reaches it).

What 5.17's ``GPTJAttention`` computes: its ``forward`` projects and rotates q/k, appends to the KV cache and calls
``self._attn(query, key, value, attention_mask)`` with query ``[B, H, L, D]``, key/value ``[B, H, S, D]`` (the cache
included) and the 4-D additive mask ``[B, 1, L, S]`` that ``create_causal_mask`` builds for eager attention (0 where
query i sees key j, i.e. ``j <= S - L + i`` and key j is not padding; ``finfo(dtype).min`` elsewhere). ``_attn`` casts
q and k to float32, divides the scores by ``scale_attn`` (``sqrt(D)``), adds the mask, softmaxes, casts to v's dtype,
applies ``attn_dropout`` and multiplies by v; it returns ``(output [B, H, L, D], weights [B, H, L, S])``.

The patch (per instance, undone by ``restore``; no class or module is patched):

* each ``GPTJAttention``'s ``_attn`` becomes an instance attribute, ``functools.partial(_fastpeft_attn, module,
  state)``, which computes the same attention through ``fastpeft.prefix_attention`` in float32 (the autocast dtype
  under autocast, as GPT-J's matmuls then run), scale ``1 / scale_attn``, bottom-right causal in the kernels, the key
  padding read off the 4-D mask (its last query row: see ``_key_padding``, which checks the whole mask has that
  form and refuses any other pattern), plus the prefix of the call, if any;
* the prefix: ``GPTJForCausalLM.forward`` does not hand its ``**kwargs`` to ``GPTJModel``, nor ``GPTJModel.forward``
  to its blocks, so the ``fastpeft_prefix`` keyword of ``fastpeft.accelerate`` cannot travel down as it does on
  interface models. A forward pre-hook on the patched (outermost) model takes it out of the keyword arguments and
  holds it, per thread, for the duration of that call; a forward hook (``always_call``: also when the forward raises)
  drops it. ``_attn`` reads its layer's K/V by ``layer_idx``. Every GPT-J model inside (``GPTJModel``) gets the same
  hooks: a call of it inside the outer call keeps the outer call's prefix, and a call of it alone
  (``.transformer(...)``) still tells ``_attn`` its ``output_attentions``.
* gradient checkpointing recomputes each block in the backward, after the call has returned. The recomputation hands
  ``_attn`` the very mask tensor of the forward (non-reentrant checkpointing keeps the block's keyword arguments), so
  the first ``_attn`` of a call files its plan (the call's prefix and whether it runs unfused, with the validated key
  padding) under that mask, weakly: the recomputation finds the same plan, and the entry dies with the mask.
* attention dropout in training, and ``output_attentions``, run GPT-J's own ``_attn`` (the class's) over
  ``[prefix ; keys]`` with the prefix columns visible to every query: what PEFT computes with its prefix in the
  cache, down to the dropout's random draws and the returned weights ``[B, H, L, P + S]``.

Held per thread, so threads may run one model concurrently. A query that sees no key at all (a left-padding query
without a prefix) gets zeros from the kernels, where eager GPT-J averages every value: only the logits at such
padding positions differ (those of real tokens and every gradient do not).
"""

import functools
import inspect
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import compat, handwritten
from .attention import PREFIX_KWARG, _no_prefix, autocast_dtype
from ..ops.prefix_attention import prefix_attention_prevalidated

# GPTJAttention._attn's parameters on the releases this patch reproduces (4.x added head_mask).
_ATTN_PARAMETERS = ("self", "query", "key", "value", "attention_mask")


def _gptj_attention_class():
    from transformers.models.gptj import modeling_gptj

    return modeling_gptj.GPTJAttention


def matches(model):
    """Whether ``model`` (a ``PreTrainedModel``) is a GPT-J whose attention modules all run the hand-written
    ``GPTJAttention._attn`` this module reproduces: not on the attention interface (5.2x's GPT-J is), every attention
    module of exactly that class (not ``GPTJFlashAttention2``) and ``_attn`` with 5.17's parameters."""
    from transformers.models.gptj import modeling_gptj

    if not isinstance(model, modeling_gptj.GPTJPreTrainedModel) or compat.uses_attention_interface(model):
        return False
    attention_class = _gptj_attention_class()
    attn = getattr(attention_class, "_attn", None)
    if not callable(attn) or tuple(inspect.signature(attn).parameters) != _ATTN_PARAMETERS:
        return False
    modules = [module for module in model.modules() if isinstance(module, attention_class)]
    return bool(modules) and all(type(module) is attention_class for module in modules)


def prefix_refusal(model):
    """None: the pre-hook on the patched model hands the prefix to every layer (see the module docstring)."""
    return None


class _Call:
    """One forward of the patched model (or of a GPT-J model in it): ``prefix`` (the ``PrefixSpec`` of
    ``fastpeft_prefix``, or None) and ``output_attentions`` (the call's, or the config's default)."""

    __slots__ = ("prefix", "output_attentions")

    def __init__(self, prefix, output_attentions):
        self.prefix = prefix
        self.output_attentions = output_attentions


_NO_CALL = _Call(None, False)  # an attention call outside any forward of the patched model (a bare submodule call)


class _Plan:
    """What every ``_attn`` of one call, and its checkpoint recomputation, use: the call; the key padding mask
    ``[B, S]`` (bool) that, with bottom-right causality, is the call's 4-D mask (None: no padding); the kernels' plan
    cache (``prefix_attention_prevalidated``'s ``plan_cache``: the layers' calls share one validation and backend
    plan, which identifies the mask and the no-prefix index tensors by object, hence one of each per plan) and
    ``no_prefix``, ``attention._no_prefix``'s tensors for calls without a prefix, made by the first such call."""

    __slots__ = ("call", "key_padding", "kernel_plans", "no_prefix")

    def __init__(self, call, key_padding):
        self.call = call
        self.key_padding = key_padding
        self.kernel_plans = {}
        self.no_prefix = None


class _State:
    """The patched model's live state: the calls under way in each thread (a stack: calls can nest) and the plans
    filed under their masks. Nothing of it outlives a call (and its backward), so a pickled or deep-copied model
    gets a fresh one."""

    def __init__(self):
        self.local = threading.local()
        self.plans = WeakIdKeyDictionary()

    def __reduce__(self):
        return _State, ()

    def calls(self):
        calls = getattr(self.local, "calls", None)
        if calls is None:
            calls = self.local.calls = []
        return calls

    def plan(self, attention_mask, query, key, training):
        """The ``_Plan`` of an ``_attn`` call with ``attention_mask`` (the 4-D mask, or None), query ``[B, H, L, D]``
        and key ``[B, H, S, D]``. Within a call, the first layer files it under the mask and the others find it;
        outside any call (a checkpoint recomputation) the mask's filed plan is the one its forward used."""
        calls = self.calls()
        call = calls[-1] if calls else None
        if attention_mask is None:
            # Eager GPT-J always builds a mask; without one, a recomputation could not be told from a bare call.
            if call is None and training and torch.is_grad_enabled():
                raise ValueError("GPT-J's attention got attention_mask=None outside a forward of the accelerated "
                                 "model while training: fastpeft cannot tell which prefix a checkpoint "
                                 "recomputation needs")
            return _Plan(call or _NO_CALL, None)
        plan = self.plans.get(attention_mask)
        if plan is None or (call is not None and plan.call is not call):
            plan = _Plan(call or _NO_CALL, _key_padding(attention_mask, query.shape[0], query.shape[2], key.shape[2]))
            self.plans[attention_mask] = plan
        return plan


def _key_padding(attention_mask, batch, query_length, key_length):
    """The key padding mask ``[batch, S]`` (bool, True = real key) of GPT-J's 4-D additive mask
    ``[1 or batch, 1, L, S]``: its last query row, which sits at position ``S - 1`` and so sees every real key; None on
    CPU when every key is real (a plain read there, which spares every layer its mask handling). Raises ValueError
    unless the whole mask is exactly causal-with-padding (0 where ``j <= S - L + i`` and key j is real, ``finfo.min``
    elsewhere), the pattern the kernels compute: packed sequences, a static cache's empty slots or a custom mask are
    refused, never approximated. Costs one comparison of the mask, and one device sync, per forward (the plan is
    filed)."""
    mask = attention_mask
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or \
            tuple(mask.shape[2:]) != (query_length, key_length):
        raise ValueError(f"GPT-J's attention_mask must be the 4-D additive mask [B, 1, L={query_length}, "
                         f"S={key_length}] eager GPT-J builds, got shape {tuple(getattr(mask, 'shape', ()))}")
    keys = mask[:, 0, -1] == 0
    causal = torch.ones(query_length, key_length, dtype=torch.bool, device=mask.device).tril(key_length - query_length)
    expected = torch.where(keys[:, None, :] & causal, torch.zeros((), dtype=mask.dtype, device=mask.device),
                           torch.finfo(mask.dtype).min)
    if not torch.equal(mask[:, 0], expected):
        raise ValueError("fastpeft computes GPT-J's attention for causal masks with key padding; this call's "
                         "attention_mask has another pattern (packed sequences via position_ids, a static cache, or "
                         "a custom 4-D mask)")
    if keys.device.type == "cpu" and bool(keys.all()):
        return None
    return keys.expand(batch, -1)


def _prefix_of(plan, module):
    """``(prefix_k, prefix_v)`` ``[Hkv, P, D]`` of ``module``'s layer in the plan's call, or ``(None, None)``."""
    spec = plan.call.prefix
    if spec is None:
        return None, None
    spec = spec.for_module(module)
    prefix_k, prefix_v = spec.layer(module.layer_idx)
    if prefix_k is not None and prefix_k.dim() != 3:
        raise ValueError("GPT-J's hand-written attention takes fastpeft.accelerate's shared prefix [Hkv, P, D]; "
                         f"got a prefix table of shape {tuple(prefix_k.shape)}")
    return prefix_k, prefix_v


def _unfused(module, query, key, value, attention_mask, prefix_k, prefix_v):
    """GPT-J's own ``_attn`` (the class's) over ``[prefix ; keys]``, the prefix columns visible to every query (PEFT's
    mask puts ones in front of the attention mask): PEFT's computation with the prefix in its cache, dropout draws
    and weights ``[B, H, L, P + S]`` included."""
    if prefix_k is not None:
        batch = query.shape[0]
        prefix_k = prefix_k.to(device=key.device, dtype=key.dtype).expand(batch, -1, -1, -1)
        prefix_v = prefix_v.to(device=value.device, dtype=value.dtype).expand(batch, -1, -1, -1)
        key, value = torch.cat([prefix_k, key], dim=2), torch.cat([prefix_v, value], dim=2)
        if attention_mask is not None:
            visible = attention_mask.new_zeros(*attention_mask.shape[:3], prefix_k.shape[2])
            attention_mask = torch.cat([visible, attention_mask], dim=-1)
    return type(module)._attn(module, query, key, value, attention_mask)


def _fastpeft_attn(module, state, query, key, value, attention_mask=None):
    """``GPTJAttention._attn`` through fastpeft's kernels. query ``[B, H, L, D]``, key/value ``[B, H, S, D]``,
    attention_mask ``[B, 1, L, S]`` additive (or None). Returns ``(output [B, H, L, D] in value's dtype, None)``; with
    ``output_attentions`` or attention dropout in training, GPT-J's own math and its weights (``_unfused``)."""
    plan = state.plan(attention_mask, query, key, module.training)
    prefix_k, prefix_v = _prefix_of(plan, module)
    dropout = module.attn_dropout.p if module.training else 0.0
    if plan.call.output_attentions or dropout:
        # The kernels return no weights and have no dropout.
        return _unfused(module, query, key, value, attention_mask, prefix_k, prefix_v)

    # GPT-J computes the scores in float32 "to avoid overflow"; under autocast its matmuls run in the autocast dtype.
    dtype = autocast_dtype(query.device.type, default=torch.float32)
    out_dtype = value.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if prefix_k is None:
        if plan.no_prefix is None:
            plan.no_prefix = _no_prefix(key)
        prefix_k, prefix_v, prefix_index, prefix_lengths = plan.no_prefix
    else:
        prefix_k = prefix_k.to(device=query.device, dtype=dtype)
        prefix_v = prefix_v.to(device=query.device, dtype=dtype)
        prefix_index, prefix_lengths = None, None
    out = prefix_attention_prevalidated(query, key, value, prefix_k, prefix_v, prefix_index=prefix_index,
                                        prefix_lengths=prefix_lengths, key_padding_mask=plan.key_padding,
                                        causal=True, softmax_scale=1.0 / module.scale_attn,
                                        plan_cache=plan.kernel_plans)
    return out.to(out_dtype), None


def _enter_call(state, model, args, kwargs):
    """Forward pre-hook of the patched model and the GPT-J models inside it: the call begins; its ``fastpeft_prefix``
    leaves the keyword arguments (the model's forward would drop it, or hand it to its loss function) and is held for
    the call. A call inside another (``GPTJForCausalLM`` calling its ``GPTJModel``) without a prefix of its own keeps
    the enclosing call's."""
    calls = state.calls()
    prefix = kwargs.pop(PREFIX_KWARG, None)
    if prefix is None and calls:
        prefix = calls[-1].prefix
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = getattr(model.config, "output_attentions", False)
    # Pushed before anything can raise: the exit hook, which also runs when this hook raises, pops it.
    calls.append(_Call(prefix, bool(output_attentions)))
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        # A 4-D mask reaches the blocks as it is, the same tensor in every call that passes it: its filed plan could
        # not tell those calls' prefixes apart (and fastpeft attention takes 2-D masks on every model).
        raise ValueError(f"fastpeft attention takes a 2-D attention_mask [B, S]; {type(model).__name__} got a "
                         f"{mask.dim()}-D one (a custom 4-D mask is not supported)")
    return args, kwargs


def _exit_call(state, model, args, kwargs, output):
    """Forward hook (``always_call``) beside each ``_enter_call``: the call ends, also when it raised."""
    calls = state.calls()
    if calls:
        calls.pop()


def _unpatch(modules, hooks):
    """The undo of ``patch``: the modules' own ``_attn`` and none of the hooks (their ``RemovableHandle``s) again."""
    for module in modules:
        module.__dict__.pop("_attn", None)
    for hook in hooks:
        hook.remove()


def _is_patched(module):
    attn = module.__dict__.get("_attn")
    return isinstance(attn, functools.partial) and attn.func is _fastpeft_attn


def _nothing_to_undo():
    """The undo of a ``patch`` that found the model patched already."""


def patch(model):
    """Switch every ``GPTJAttention`` of ``model`` (the outermost model, which ``fastpeft.accelerate``'s prefix
    keyword reaches) to fastpeft. Returns the picklable undo. A model patched already (a second PEFT model on the same
    backbone) keeps its patch, and the first undo undoes it, as the attention implementation of interface models."""
    from transformers.models.gptj import modeling_gptj

    modules = [module for module in model.modules() if isinstance(module, _gptj_attention_class())]
    if any(_is_patched(module) for module in modules):
        return _nothing_to_undo
    state = _State()
    for module in modules:
        module._attn = functools.partial(_fastpeft_attn, module, state)
    hooks = []
    for holder in model.modules():
        if holder is model or isinstance(holder, modeling_gptj.GPTJPreTrainedModel):
            # prepend: no other pre-hook runs before the call is pushed (see _enter_call).
            hooks.append(holder.register_forward_pre_hook(functools.partial(_enter_call, state), with_kwargs=True,
                                                          prepend=True))
            hooks.append(holder.register_forward_hook(functools.partial(_exit_call, state), with_kwargs=True,
                                                      always_call=True))
    return functools.partial(_unpatch, tuple(modules), tuple(hooks))


handwritten.register(handwritten.HandwrittenFamily(name="GPT-J", matches=matches, prefix_refusal=prefix_refusal,
                                                   patch=patch))
