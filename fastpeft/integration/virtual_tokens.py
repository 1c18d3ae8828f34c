"""The keys and values of prompt tuning's and p-tuning's virtual tokens, computed once.

PEFT prepends P virtual-token embeddings to every row. They sit first and, under causal attention, see only each
other, so their keys and values (RoPE included) are the same for every row and every step: fastpeft computes them
once and serves them as a prefix, to ``fastpeft.accelerate``'s generate and to ``AdapterBank`` alike.
"""


def virtual_token_key_values(model, prompts, layer_sources=None):
    """Run virtual-token embeddings ``prompts [1, P, hidden]`` through ``model`` (prompt tuning, p-tuning) as one row at
    positions ``0 .. P-1``, PEFT's place for them: they come first and see only each other, so their keys and values
    never depend on what follows. Returns per-layer ``(keys, values)``, each ``[Hkv, P, D]`` (rotated at those
    positions, as PEFT's cache holds them). PEFT runs them once per row and keeps B copies in the cache; this is the
    one copy every row reads.

    ``layer_sources`` maps a layer that keeps no cache of its own (Gemma 4's KV sharing) to the layer it reads.
    """
    from transformers import DynamicCache

    from . import compat

    # A cache of full layers, built without the model's config: a sliding-window layer's own cache would keep only
    # the last window - 1 virtual tokens, and every later query that the window lets see the others needs them all.
    output = model(inputs_embeds=prompts, use_cache=True, **compat.cache_kwargs(model, DynamicCache()))
    cache = compat.cache_of(output)
    if cache is None:  # transformers drops the cache when gradient checkpointing is on in training mode
        raise ValueError("the virtual tokens of prompt tuning / p-tuning need the backbone's KV cache; with gradient "
                         "checkpointing enabled, call model.eval() first")
    layer_sources = layer_sources or {}
    P = prompts.shape[1]
    keys, values = [], []
    for layer in range(max(len(cache), 1 + max(layer_sources, default=-1))):
        layer_k, layer_v = compat.cache_layer_key_values(cache, layer_sources.get(layer, layer))
        if layer_k is None or layer_k.shape[-2] != P:
            raise ValueError(f"{type(model).__name__}'s layer {layer} kept no keys for the {P} virtual tokens in its "
                             "cache; fastpeft cannot serve them to that layer")
        keys.append(layer_k[0])
        values.append(layer_v[0])
    return keys, values
