"""The entry points: ``accelerate`` (check, then install the accelerated methods on the instance), ``restore``
(undo it), ``fallback_reason`` / ``is_accelerated`` (what ``accelerate`` did) and ``FallbackWarning``.
"""

import functools
import warnings

from .. import attention, compat, handwritten, sharding
from .causal import accelerated_forward
from .checks import check_adapter_type, check_backbone, check_peft_config, supported_peft_classes
from .generation import accelerated_generate, accelerated_seq2seq_generate
from .seq2seq import accelerated_seq2seq_forward
from .state import FALLBACK_ATTR, STATE_ATTR, AccelerationState

# Instance attributes accelerate() sets on the PeftModel; restore() deletes exactly these.
_OVERRIDDEN_METHODS = ("forward", "generate", "_setup_prompt_encoder", "save_pretrained")


class FallbackWarning(UserWarning):
    """``fastpeft.accelerate`` left a model on PEFT's own path (its backbone's attention is one fastpeft cannot
    compute); the message names why. ``accelerate(model, strict=True)`` raises instead."""


def accelerate(peft_model, *, strict=False):
    """Run a PEFT prompt-learning model's attention through fastpeft's fused prefix attention.

    Arguments:
        peft_model: a ``peft.PeftModelForCausalLM``, ``PeftModelForSequenceClassification`` or
            ``PeftModelForFeatureExtraction`` whose backbone computes attention through transformers' attention
            interface with plain softmax attention (Llama, Mistral, Qwen2/3, GPT-2, OPT, GPT-J, Gemma 3, Gemma 4,
            Phi, GPT-NeoX, BERT, RoBERTa, ...; see ``attention.check_supported_model``) or by hand in a family fastpeft
            patches per instance (``handwritten_gptj``: GPT-J on transformers 5.17), and whose adapters are
            PREFIX_TUNING (with or without ``prefix_projection``), PROMPT_TUNING, P_TUNING or CPT; or a
            ``PeftModelForSeq2SeqLM`` with PROMPT_TUNING / P_TUNING adapters (BART; T5 and MT5, whose relative
            position bias the kernels add as their ``attn_bias``) or PREFIX_TUNING adapters (BART, T5, MT5). The
            backbone may be loaded in 4-bit or 8-bit through bitsandbytes. DeBERTa / DeBERTa-v2 backbones run
            PROMPT_TUNING and P_TUNING on fastpeft's kernels through an instance patch of their hand-written
            disentangled attention (``handwritten_deberta``); PEFT's prefix tuning never reaches their attention
            (they take no KV cache), so such adapters fall back.
        strict: what to do with a backbone whose attention fastpeft cannot compute (hand-written attention that
            bypasses the attention interface outside the ``handwritten`` families, such as Falcon's up to
            transformers 5.24, or a feature the kernels lack, named in the message). False (default): warn once with
            a ``FallbackWarning`` naming why and leave the model on PEFT's own path, untouched (same numbers, PEFT's
            speed; ``is_accelerated`` is False, ``restore`` is a no-op). True: raise ``ValueError`` instead.

    Returns:
        the same object, accelerated in place: forward outputs (logits, loss), prompt-parameter gradients,
        ``generate`` tokens and saved adapter files equal PEFT's. Calling it twice is a no-op.

    Raises:
        ValueError: for another PEFT model class or adapter type, a prefix-tuning configuration whose prefix does
            not split into the backbone's KV heads (or, on an encoder-decoder, one PEFT itself fails on), and, with
            ``strict=True``, a backbone fastpeft cannot compute (``attention.UnsupportedModelError``).
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"fastpeft.accelerate takes a peft.PeftModel, got {type(peft_model).__name__}")
    if hasattr(peft_model, STATE_ATTR) or (hasattr(peft_model, FALLBACK_ATTR) and not strict):
        return peft_model
    compat.warn_if_untested("fastpeft.accelerate")
    if not isinstance(peft_model, supported_peft_classes()):
        raise ValueError(f"fastpeft.accelerate supports "
                         f"{', '.join(cls.__name__ for cls in supported_peft_classes())}, "
                         f"got {type(peft_model).__name__}")
    for adapter_name in peft_model.peft_config:
        check_adapter_type(peft_model, adapter_name)
    # The backbone before the adapters' shapes: those are read from a transformers config, which a backbone
    # fastpeft leaves to PEFT (any nn.Module with a config) need not have.
    try:
        check_backbone(peft_model)
    except attention.UnsupportedModelError as error:
        if strict:
            raise
        # A drop-in should not break a script over a model it cannot speed up: PEFT's own path gives PEFT's numbers.
        warnings.warn(f"{error}. The model stays on PEFT's own path (fastpeft.accelerate(model, strict=True) "
                      "raises instead)", FallbackWarning, stacklevel=2)
        setattr(peft_model, FALLBACK_ATTR, str(error))
        return peft_model
    for adapter_name in peft_model.peft_config:
        check_peft_config(peft_model, adapter_name)

    previous = attention.use_fastpeft_attention(peft_model.get_base_model())
    undo_handwritten = handwritten.patch(peft_model.get_base_model())
    setattr(peft_model, STATE_ATTR, AccelerationState(previous, undo_handwritten,
                                                      sharding.leave_out_embedding_alias(peft_model)))
    # functools.partial rather than bound methods: a partial pickles and deep-copies by value (a bound method
    # pickles as getattr(model, function name), which the unpickled model would not have). It pickles the function
    # by its module and name, so these stay module-level functions under stable names.
    from peft import PeftModelForCausalLM, PeftModelForSeq2SeqLM

    seq2seq = isinstance(peft_model, PeftModelForSeq2SeqLM)
    peft_model.forward = functools.partial(accelerated_seq2seq_forward if seq2seq else accelerated_forward,
                                           peft_model)
    peft_model._setup_prompt_encoder = functools.partial(_setup_prompt_encoder_allowing_checkpointing, peft_model)
    peft_model.save_pretrained = functools.partial(_save_pretrained_sharded_or_not, peft_model)
    if isinstance(peft_model, PeftModelForCausalLM):
        peft_model.generate = functools.partial(accelerated_generate, peft_model)
    elif seq2seq:
        peft_model.generate = functools.partial(accelerated_seq2seq_generate, peft_model)
    return peft_model


def restore(peft_model):
    """Undo ``accelerate``: PEFT's own forward/generate and the backbone's previous attention implementation
    come back. Returns the same object (a model ``accelerate`` left on PEFT's path comes back as it was). Raises
    ValueError for a model ``accelerate`` was not applied to."""
    if hasattr(peft_model, FALLBACK_ATTR):
        delattr(peft_model, FALLBACK_ATTR)
        return peft_model
    state = getattr(peft_model, STATE_ATTR, None)
    if state is None:
        raise ValueError("fastpeft.restore: this model was not accelerated by fastpeft.accelerate")
    for name in _OVERRIDDEN_METHODS:
        peft_model.__dict__.pop(name, None)
    state.undo_handwritten()
    for hook in state.hooks:
        hook.remove()
    base = peft_model.get_base_model()
    if compat.uses_attention_interface(base):
        compat.set_attn_implementation(base, state.previous_attn_implementation)
    delattr(peft_model, STATE_ATTR)
    return peft_model


def fallback_reason(peft_model):
    """Why ``accelerate`` left this model on PEFT's own path, or None (accelerated, or never given to it)."""
    return getattr(peft_model, FALLBACK_ATTR, None)


def is_accelerated(peft_model):
    """Whether ``accelerate`` runs this model on fastpeft (and ``restore`` has not undone it)."""
    return hasattr(peft_model, STATE_ATTR)


def _save_pretrained_sharded_or_not(self, save_directory, **kwargs):
    """PEFT's ``save_pretrained``, except on a model sharded with FSDP2, where PEFT runs the prompt encoder on the
    sharded parameters (and fails) and ignores a passed ``state_dict``: ``sharding.save_pretrained`` writes the same
    files from the ``state_dict`` transformers' Trainer passes, or from the gathered prompt parameters."""
    if not sharding.is_sharded(self):
        return type(self).save_pretrained(self, save_directory, **kwargs)
    unsupported = sorted(key for key, value in kwargs.items()
                         if key not in ("selected_adapters", "state_dict", "is_main_process", "safe_serialization")
                         and value is not None)
    if unsupported or kwargs.get("safe_serialization") is False:
        raise ValueError(f"save_pretrained of a model sharded with FSDP2 writes safetensors and takes "
                         f"selected_adapters, state_dict and is_main_process; got {unsupported or 'safe_serialization=False'}")
    sharding.save_pretrained(self, save_directory, selected_adapters=kwargs.get("selected_adapters"),
                             state_dict=kwargs.get("state_dict"), is_main_process=kwargs.get("is_main_process"))


def _setup_prompt_encoder_allowing_checkpointing(self, adapter_name):
    """PEFT refuses to set up a prefix-tuning encoder when gradient checkpointing is on, because its prefix lives
    in the KV cache, which checkpoint recomputation corrupts. fastpeft passes the prefix as a keyword argument, so
    the refusal does not apply: hide the flag from PEFT's check for the duration of the setup."""
    checkpointing = [module for module in self.get_base_model().modules()
                     if getattr(module, "gradient_checkpointing", False)]
    for module in checkpointing:
        module.gradient_checkpointing = False
    try:
        type(self)._setup_prompt_encoder(self, adapter_name)
    finally:
        for module in checkpointing:
            module.gradient_checkpointing = True
    check_peft_config(self, adapter_name)
    check_backbone(self)  # a prefix-tuning adapter added to a prompt-tuning model needs more of the backbone
