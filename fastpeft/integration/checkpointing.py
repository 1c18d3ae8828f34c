"""Activation checkpointing switch that works across transformers releases."""


def set_checkpointing(model, enabled):
    """Turn non-reentrant activation checkpointing of a transformers model on or off, under the method name of
    the installed transformers (v5.2x renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*``).
    Non-reentrant: the reentrant variant drops keyword arguments (the prefix) from the recomputed graph."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
