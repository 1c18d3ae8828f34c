"""The built-in task of ``fastpeft train`` without ``--data``: something a prefix visibly learns.

The built-in model is random, so it answers anything with noise. The task gives it two kinds of prompts with a
fixed answer each: a question ``"Q: where is the <thing> <thing>?"`` -> ``" A: in the kernel."`` and a greeting
``"Say hi to <thing> <thing>"`` -> ``" Hi there!"``. The things are drawn from a word list, so the held-out prompts
(never trained on) are new combinations: answering them right means the prefix learned to tell the two kinds
apart and answer each, which the base model cannot do. After training, ``train`` prints the held-out prompts'
greedy completions by the base model and with the trained prefix, side by side, and the exact-match score.
"""

import random

from ..data import Example

WORDS = ("apple", "river", "stone", "cloud", "tiger", "pencil", "orange", "window", "garden", "rocket", "silver",
         "candle", "forest", "mirror", "planet", "castle", "violin", "desert", "harbor", "lantern")
TRAIN_EXAMPLES = 64
HELD_OUT = 8
# Settings that learn the task in about a minute on a laptop CPU (the built-in model, batch 8); the command
# line's own values win when given.
LEARNING_RATE = 5e-2
STEPS = 160


def _example(kind, rng):
    first, second = rng.sample(WORDS, 2)
    if kind == 0:
        return Example(f"Q: where is the {first} {second}?", " A: in the kernel.")
    return Example(f"Say hi to {first} {second}", " Hi there!")


def examples():
    """``(train, held_out)`` lists of ``Example``: the two kinds alternate; no held-out prompt is a training
    prompt."""
    rng = random.Random(0)
    train = [_example(i % 2, rng) for i in range(TRAIN_EXAMPLES)]
    seen = {example.prompt for example in train}
    held_out = []
    while len(held_out) < HELD_OUT:
        example = _example(len(held_out) % 2, rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            held_out.append(example)
    return train, held_out


def _greedy_completions(model, tokenizer, prompts, max_new_tokens):
    """Greedy completions of ``prompts`` (one left-padded batch): the accelerated model's ``generate``; a plain
    PEFT model (``--no-accelerate``) runs its forward without a cache instead, since PEFT's own ``generate`` is
    wrong on transformers 5.24."""
    import torch

    from ..integration.peft import is_accelerated
    from ..integration.reference_generate import generate_without_cache

    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        if is_accelerated(model):
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            generated, _ = generate_without_cache(model, encoded["input_ids"], encoded["attention_mask"],
                                                  max_new_tokens=max_new_tokens,
                                                  eos_token_id=model.generation_config.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(peft_model, tokenizer, held_out):
    """Greedy completions of the held-out prompts with the adapter disabled (the base model) and enabled.

    Returns ``{"prompts", "expected", "base", "trained", "base_correct", "trained_correct"}``."""
    prompts = [example.prompt for example in held_out]
    expected = [example.completion for example in held_out]
    max_new_tokens = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in expected) + 2
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            base = _greedy_completions(peft_model, tokenizer, prompts, max_new_tokens)
        trained = _greedy_completions(peft_model, tokenizer, prompts, max_new_tokens)
    finally:
        peft_model.train(was_training)

    def correct(outputs):
        return sum(output.strip() == want.strip() for output, want in zip(outputs, expected))

    return {"prompts": prompts, "expected": expected, "base": base, "trained": trained,
            "base_correct": correct(base), "trained_correct": correct(trained)}


def report(result):
    """The side-by-side table ``train`` prints."""
    def shown(text, width):
        text = repr(text)
        return text if len(text) <= width else text[:width - 3] + "..."

    lines = ["held-out prompts (not in the training data), greedy completions:",
             f"  {'prompt':<32} {'base model':<24} with the trained prefix"]
    for prompt, base, trained in zip(result["prompts"], result["base"], result["trained"]):
        lines.append(f"  {shown(prompt, 32):<32} {shown(base, 24):<24} {shown(trained, 30)}")
    total = len(result["prompts"])
    lines.append(f"exact answers: base model {result['base_correct']}/{total}, "
                 f"with the trained prefix {result['trained_correct']}/{total}")
    return "\n".join(lines)
