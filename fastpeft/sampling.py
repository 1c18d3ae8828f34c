"""Sampling settings and the logits processors they mean, the way transformers' ``generate`` applies them.

One copy for everything in fastpeft that picks tokens by itself (the serving engine, the cache-free reference
generator); ``AdapterBank.generate`` runs transformers' own ``generate`` and only checks its arguments here.
"""

# transformers' global defaults for sampling arguments that neither the caller nor the generation config sets.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def check_sampling(temperature, top_k, top_p):
    """Raise ValueError naming the first sampling argument outside its range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number when sampling, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def resolve_sampling(generation_config, temperature=None, top_k=None, top_p=None):
    """``(temperature, top_k, top_p)`` with None resolved as transformers resolves it: the generation config's value,
    then transformers' global default; checked."""
    resolved = []
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if value is None:
            value = getattr(generation_config, name, None)
        resolved.append(SAMPLING_DEFAULTS[name] if value is None else value)
    check_sampling(*resolved)
    return tuple(resolved)


def logits_processors(do_sample, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    """transformers' logits processors and warpers, in the order its ``generate`` applies them: repetition penalty,
    then (when sampling) temperature, top-k, top-p. Empty for plain greedy decoding, so a caller can take the argmax
    without running them."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors
