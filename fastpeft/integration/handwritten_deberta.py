"""DeBERTa / DeBERTa-v2: their hand-written disentangled self-attention computed through ``fastpeft.prefix_attention``.

Every ``DisentangledSelfAttention`` of a DeBERTa or DeBERTa-v2 model (``DebertaModel``, ``DebertaV2Model`` and their
task heads) gets an instance ``forward`` (a ``functools.partial`` of ``_deberta_forward`` / ``_deberta_v2_forward``
with the module; ``restore`` pops it from the module's ``__dict__``) that computes the module's own math:

* q, k, v from the module's own projections, DeBERTa's scale ``sqrt(D * scale_factor)`` (``scale_factor`` = 1 plus
  the disentangled terms: every entry of ``pos_att_type`` in DeBERTa, ``c2p`` and ``p2c`` in DeBERTa-v2), applied
  where the module applies it (to q in DeBERTa, to k in DeBERTa-v2) with the release's own ``scaled_size_sqrt``;
* the content-to-position / position-to-content terms from the module's own ``disentangled_att_bias`` (DeBERTa) or
  ``disentangled_attention_bias`` (DeBERTa-v2), fed the arguments the original forward feeds it (``relative_pos``,
  ``rel_embeddings`` after the module's ``pos_dropout``), handed to the kernels as their ``attn_bias``
  ``[B, H, L, S]`` (differentiable: the bias's gradient reaches q, k and the position projections);
* DeBERTa's mask, exactly. The encoder hands every layer ``[B, 1, L, S]`` = query mask x key mask (an int tensor;
  a user's 3-D mask ``[B, L, S]`` arrives as ``[B, 1, L, S]`` too), and the module fills masked scores with
  ``finfo.min`` before a plain softmax (transformers 5.x has no ``XSoftmax``). A query that sees some key attends to
  those keys; a fully masked query row (a padded query) is *not* zeroed: all its scores are equal, so it attends
  uniformly to all S keys, padding included, and outputs the mean of the values. fastpeft folds the mask into
  ``attn_bias`` as ``-inf`` (the kernels return zeros for such rows) and writes the mean of the values into the fully
  masked rows afterwards (``_attend``);
* attention dropout as the module's ``dropout`` (training only) on the unfused reference path
  (``attention.prefix_attention_with_dropout``, as ``fastpeft_attention_forward``); the uniform rows get it too.

Calls the kernels do not compute run the class's own forward for that call: ``output_attentions=True`` (the kernels
never materialize the probabilities), DeBERTa's ``query_states`` (its own code for it transposes a 2-D tensor and
fails on batched states) and DeBERTa-v2 queries longer than the keys. Checked against transformers 5.17 and 5.24,
whose two attention modules are the same code. PEFT's prefix tuning never reaches DeBERTa's attention (its forward
takes no KV cache), so prefix-tuning adapters stay on PEFT's path (``_prefix_refusal``).
"""

import functools
import inspect
import sys

import torch
from transformers.models.deberta import modeling_deberta
from transformers.models.deberta_v2 import modeling_deberta_v2

from . import handwritten
from .attention import _no_prefix, autocast_dtype, prefix_attention_with_dropout

# The parameters of both releases' DisentangledSelfAttention.forward, which the patched forwards take (and honour).
_FORWARD_PARAMETERS = ("self", "hidden_states", "attention_mask", "output_attentions", "query_states", "relative_pos",
                       "rel_embeddings")
# The attributes each patched forward reads, per attention class.
_DEBERTA_ATTRIBUTES = ("in_proj", "q_bias", "v_bias", "num_attention_heads", "pos_att_type", "relative_attention",
                       "head_logits_proj", "head_weights_proj", "dropout", "transpose_for_scores",
                       "disentangled_att_bias")
_DEBERTA_V2_ATTRIBUTES = ("query_proj", "key_proj", "value_proj", "num_attention_heads", "pos_att_type",
                          "relative_attention", "dropout", "transpose_for_scores", "disentangled_attention_bias")


def _visible(attention_mask, shape):
    """DeBERTa's attention mask (nonzero = the query sees the key) as a bool ``[1|B, 1|H, 1|L, 1|S]`` view that
    broadcasts to ``shape`` = ``(B, H, L, S)`` as the module's ``masked_fill`` broadcasts it. Raises ValueError for a
    mask that does not."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor broadcastable to the scores [B, H, L, S] = "
                         f"{list(shape)} (DeBERTa's encoder always passes one), got {type(attention_mask).__name__}")
    try:
        broadcast = torch.broadcast_shapes(attention_mask.shape, shape)
    except RuntimeError:
        broadcast = None
    if attention_mask.dim() > 4 or broadcast != torch.Size(shape):
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not broadcast to the scores "
                         f"[B, H, L, S] = {list(shape)}")
    return attention_mask.bool()[(None,) * (4 - attention_mask.dim())]


def _attend(module, query, key, value, attention_mask, rel_bias):
    """DeBERTa's masked softmax attention through the kernels (``softmax_scale`` 1). query ``[B, H, L, D]``, key/value
    ``[B, H, S, D]``, ``S >= L``, DeBERTa's scale already applied (to q or to k, where the module applies it);
    ``attention_mask`` as the module gets it; ``rel_bias`` None or the disentangled terms broadcastable to
    ``[B, H, L, S]``. Returns ``[B, H, L, D]``.

    The mask enters ``attn_bias`` as ``-inf`` (``rel_bias`` where visible); rows with no visible key then get the
    mean of the values (the uniform softmax of DeBERTa's ``finfo.min``-filled scores), dropped out like the others
    when the module's dropout is active."""
    B, H, L, D = query.shape
    S = key.shape[2]
    visible = _visible(attention_mask, (B, H, L, S))
    dtype = autocast_dtype(query.device.type)
    if dtype is not None:
        # The projections come out in the autocast dtype but adding DeBERTa's float32 q_bias / v_bias promotes q and v
        # to float32.
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    neg_inf = torch.tensor(float("-inf"), dtype=query.dtype, device=query.device)
    seen = query.new_zeros(()) if rel_bias is None else rel_bias.to(query.dtype)
    attn_bias = torch.where(visible, seen, neg_inf)
    attn_bias = attn_bias.expand(*attn_bias.shape[:3], S)  # a mask broadcast along the keys: the kernels take S columns
    prefix_k, prefix_v, prefix_index, prefix_lengths = _no_prefix(key, 0)
    dropout = module.dropout.p if module.training else 0.0
    out = prefix_attention_with_dropout(module, query, key, value, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                        None, False, 1.0, attn_bias, dropout)
    if dropout:  # the uniform rows are dropped out too, as the module drops out every row
        uniform = torch.nn.functional.dropout(value.new_full((B, H, L, S), 1.0 / S), dropout) @ value
    else:
        uniform = value.mean(2, keepdim=True)
    return torch.where(visible.any(-1, keepdim=True), out, uniform)


def _merge_heads(context):
    """``[B, H, L, D]`` -> ``[B, L, H * D]``, the module's output layout."""
    B, H, L, D = context.shape
    return context.permute(0, 2, 1, 3).reshape(B, L, H * D)


def _deberta_forward(module, hidden_states, attention_mask, output_attentions=False, query_states=None,
                     relative_pos=None, rel_embeddings=None):
    """DeBERTa's ``DisentangledSelfAttention.forward`` (same arguments; ``hidden_states`` ``[B, L, hidden]``) through
    the kernels. Returns ``(context [B, L, H * D], None)``; with ``output_attentions`` or ``query_states``, the class's
    own forward for the call."""
    if output_attentions or query_states is not None:
        return type(module).forward(module, hidden_states, attention_mask, output_attentions, query_states,
                                    relative_pos, rel_embeddings)
    query, key, value = module.transpose_for_scores(module.in_proj(hidden_states)).chunk(3, dim=-1)
    query = query + module.transpose_for_scores(module.q_bias[None, None, :])
    value = value + module.transpose_for_scores(module.v_bias[None, None, :])
    scale_factor = 1 + len(module.pos_att_type)
    scale = sys.modules[type(module).__module__].scaled_size_sqrt(query, scale_factor)
    query = query / scale.to(dtype=query.dtype)
    rel_bias = None
    if module.relative_attention and rel_embeddings is not None and relative_pos is not None:
        rel_bias = module.disentangled_att_bias(query, key, relative_pos, module.pos_dropout(rel_embeddings),
                                                scale_factor)
        if not isinstance(rel_bias, torch.Tensor):  # pos_att_type without c2p / p2c: the method returns 0
            rel_bias = None
    return _merge_heads(_attend(module, query, key, value, attention_mask, rel_bias)), None


def _deberta_v2_forward(module, hidden_states, attention_mask, output_attentions=False, query_states=None,
                        relative_pos=None, rel_embeddings=None):
    """DeBERTa-v2's ``DisentangledSelfAttention.forward`` (same arguments; ``hidden_states`` ``[B, S, hidden]``,
    ``query_states`` None or ``[B, L, hidden]``) through the kernels. Returns ``(context [B, L, H * D], None)``; with
    ``output_attentions`` or queries longer than the keys, the class's own forward for the call."""
    queries = hidden_states if query_states is None else query_states
    if output_attentions or queries.shape[-2] > hidden_states.shape[-2]:
        return type(module).forward(module, hidden_states, attention_mask, output_attentions, query_states,
                                    relative_pos, rel_embeddings)
    heads = module.num_attention_heads
    # [B * H, L or S, D], the layout the module's disentangled_attention_bias takes
    query = module.transpose_for_scores(module.query_proj(queries), heads)
    key = module.transpose_for_scores(module.key_proj(hidden_states), heads)
    value = module.transpose_for_scores(module.value_proj(hidden_states), heads)
    scale_factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    scale = sys.modules[type(module).__module__].scaled_size_sqrt(query, scale_factor)
    rel_bias = None
    if module.relative_attention:
        rel_bias = module.disentangled_attention_bias(query, key, relative_pos, module.pos_dropout(rel_embeddings),
                                                      scale_factor)
        if not isinstance(rel_bias, torch.Tensor):  # pos_att_type without c2p / p2c: the method returns 0
            rel_bias = None
    B, L, S = query.shape[0] // heads, query.shape[1], key.shape[1]
    if rel_bias is not None:
        rel_bias = rel_bias.view(B, heads, L, S)
    key = key / scale.to(dtype=query.dtype)  # DeBERTa-v2 scales the keys of q @ k^T (not the disentangled terms' k)
    context = _attend(module, query.view(B, heads, L, -1), key.view(B, heads, S, -1), value.view(B, heads, S, -1),
                      attention_mask, rel_bias)
    return _merge_heads(context), None


_FORWARDS = {
    modeling_deberta.DisentangledSelfAttention: (_deberta_forward, _DEBERTA_ATTRIBUTES),
    modeling_deberta_v2.DisentangledSelfAttention: (_deberta_v2_forward, _DEBERTA_V2_ATTRIBUTES),
}
_MODEL_CLASSES = (modeling_deberta.DebertaPreTrainedModel, modeling_deberta_v2.DebertaV2PreTrainedModel)


def _computes(module):
    """Whether the patch computes attention ``module``: its exact class is one of the two checked (transformers 5.17
    and 5.24, whose attention code is the same), with their forward signature and the attributes the patched
    forward reads (a release that reshapes the module fails this and stays on PEFT's path), and without talking
    heads (DeBERTa's ``head_logits_proj`` / ``head_weights_proj`` mix the heads' scores, which the kernels cannot)."""
    entry = _FORWARDS.get(type(module))
    if entry is None:
        return False
    if tuple(inspect.signature(type(module).forward).parameters) != _FORWARD_PARAMETERS:
        return False
    if not all(hasattr(module, name) for name in entry[1]):
        return False
    if not hasattr(sys.modules[type(module).__module__], "scaled_size_sqrt"):
        return False
    return getattr(module, "head_logits_proj", None) is None and getattr(module, "head_weights_proj", None) is None


def _matches(model):
    """A DeBERTa / DeBERTa-v2 model (any task head) whose every disentangled attention module ``_computes``."""
    if not isinstance(model, _MODEL_CLASSES):
        return False
    attention_classes = tuple(_FORWARDS)
    return all(_computes(module) for module in model.modules() if isinstance(module, attention_classes))


def _prefix_refusal(model):
    """Why a prefix-tuning prefix cannot reach ``model``'s attention (every DeBERTa model: checked on 5.17 and 5.24)."""
    return ("DeBERTa's forward takes no KV cache, so PEFT's prefix tuning never reaches its attention (with an "
            "attention mask PEFT's forward fails with a size mismatch, without one the prefix is silently dropped): "
            "there is no PEFT computation with the prefix for fastpeft to reproduce")


def _patch(model):
    """Give every DeBERTa / DeBERTa-v2 attention module of ``model`` its fastpeft forward; returns the undo."""
    patched = []
    for module in model.modules():
        entry = _FORWARDS.get(type(module))
        if entry is not None:
            module.forward = functools.partial(entry[0], module)
            patched.append(module)
    return functools.partial(_undo, tuple(patched))


def _undo(modules):
    """Give ``modules`` back their class's forward (drop the instance attribute ``_patch`` set)."""
    for module in modules:
        module.__dict__.pop("forward", None)


handwritten.register(handwritten.HandwrittenFamily("DeBERTa", _matches, _prefix_refusal, _patch))
