"""Activation checkpointing switch that works across transformers releases."""

from .compat import checkpointing_names


def set_checkpointing(model, enabled):
    """Turn non-reentrant activation checkpointing of a transformers model on or off, under the method names of
    the installed transformers (5.2x renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*``).
    Non-reentrant: the reentrant variant drops keyword arguments (the prefix) from the recomputed graph."""
    if enabled:
        method, keyword = checkpointing_names(model)
        getattr(model, method)(**{keyword: {"use_reentrant": False}})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model):
    """Whether activation checkpointing is on for a transformers model (the property is
    ``is_activation_checkpointing`` since 5.2x, ``is_gradient_checkpointing`` before)."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)
