"""What the serving tests share: a tiny Llama (built from a config), PEFT tenants on it, and the oracle of a greedy
response (PEFT's forward looped without a cache for the tenant alone), and a gate that stops the engine between two
steps."""

import threading

import torch

from fastpeft import tiny


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tiny.PAD_ID, bos_token_id=tiny.BOS_ID, eos_token_id=tiny.EOS_ID,
                         initializer_range=0.3)  # larger than the default 0.02, so that the scores depend on the keys
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def peft_tenant(kind, seed):
    """A PEFT ``"prefix"`` (prefix tuning, 3 virtual tokens) or ``"prompt"`` (prompt tuning, 5) model on
    ``tiny_llama()``, its adapter drawn from ``seed``."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3) if kind == "prefix" else
              PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(tiny_llama(), config).eval()


def peft_greedy(peft_model, prompt, max_tokens):
    """PEFT (or the bare model for None) for this prompt (text, or token ids) alone: greedy ids, ended at eos like
    the server."""
    from fastpeft.integration.reference_generate import generate_without_cache

    ids = (tiny.build_tokenizer()(prompt, return_tensors="pt")["input_ids"] if isinstance(prompt, str) else
           torch.tensor([prompt]))
    generated, _ = generate_without_cache(peft_model if peft_model is not None else tiny_llama(), ids,
                                          max_new_tokens=max_tokens, eos_token_id=tiny.EOS_ID)
    new = generated[0, ids.shape[1]:].tolist()
    return new[:new.index(tiny.EOS_ID)] if tiny.EOS_ID in new else new


class EngineGate:
    """Stops a started ``Engine``'s thread between two steps until ``release``: a command (``Engine.call``) that waits.
    The engine runs the commands queued before an iteration, then one step; so a gate created while another one holds
    the engine lets exactly one step run between the two (``wait`` returns once this gate holds the engine)."""

    def __init__(self, engine, timeout=60):
        self.timeout = timeout
        self._entered, self._released = threading.Event(), threading.Event()
        self._caller = threading.Thread(target=engine.call, args=(self._hold, timeout), daemon=True)
        self._caller.start()

    def _hold(self, bank):
        self._entered.set()
        self._released.wait(self.timeout)

    def wait(self):
        assert self._entered.wait(self.timeout), "the engine thread did not reach the gate"
        return self

    def release(self):
        self._released.set()
        self._caller.join(self.timeout)
