"""The frozen backbone behind ``AdapterBank`` and ``MultiPrefixTrainer``: checked once, switched to fastpeft's
attention for as long as its owner holds it, and given back as it was.

Both own a transformers ``PreTrainedModel`` instance for a while and run it with a prefix keyword on every forward.
``FrozenBackbone`` is that ownership: the refusals (a ``PeftModel``, a model fastpeft's kernels do not reproduce, a
layout whose layers differ), the switch to the ``"fastpeft"`` attention implementation (an instance change, undone
by ``restore``), and one forward that hands the prefix over and checks that every layer read it.
"""

import inspect

from .integration.geometry import BaseGeometry
from .integration import compat
from .integration.attention import (ATTN_IMPLEMENTATION, PREFIX_KWARG, check_supported_model,
                                    use_fastpeft_attention)


class FrozenBackbone:
    """A transformers causal LM owned by ``user`` (its name in messages): checked, switched to fastpeft attention.

    Arguments:
        model: a transformers ``PreTrainedModel`` decoder-only causal LM (full precision or bitsandbytes 4/8-bit),
            not a ``PeftModel`` (``peft_hint`` says what to pass instead).
        eval_mode: put the model in eval mode while held (serving); ``restore`` puts its training mode back.

    ``geometry`` is the model's attention layout (one for every layer); ``device`` and ``dtype`` those of its input
    embeddings: hidden states, hence q/k/v and the prefix tables, take that dtype also when the linear layers are
    quantized.
    """

    def __init__(self, model, user, peft_hint, eval_mode):
        if hasattr(model, "peft_config"):
            raise ValueError(f"{user} takes the base transformers model, not a PeftModel: {peft_hint}")
        if not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
            raise ValueError(f"{user} takes a transformers PreTrainedModel, got {type(model).__name__}")
        if getattr(model.config, "is_encoder_decoder", False) or not model.can_generate():
            raise ValueError(f"{user} runs decoder-only causal LMs; got {type(model).__name__}")
        check_supported_model(model, user)
        compat.warn_if_untested(user)
        self.geometry = BaseGeometry.of(model.config)
        self.geometry.require_uniform(user)  # one prefix-table layout for every layer
        embedding = model.get_input_embeddings().weight
        self.model, self.user = model, user
        self.device, self.dtype = embedding.device, embedding.dtype
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._previous_attn_implementation = use_fastpeft_attention(model)
        self._was_training = model.training
        if eval_mode:
            model.eval()
        self.restored = False

    def restore(self):
        """Give the model back: its previous attention implementation and training mode. Idempotent."""
        if self.restored:
            return
        compat.set_attn_implementation(self.model, self._previous_attn_implementation)
        self.model.train(self._was_training)
        self.restored = True

    def check_attention(self):
        """Raise unless the model still runs fastpeft attention: any other implementation would drop the prefix
        keyword silently and run the bare base model."""
        current = self.model.config._attn_implementation
        if current != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"the base model's attention implementation was changed to {current!r} while {self.user} "
                               f"holds it; it needs {ATTN_IMPLEMENTATION!r} (was another bank or trainer on the same "
                               "model closed?)")

    def forward(self, spec, what, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache=None, logits_to_keep=0):
        """The model's logits with ``spec`` (a ``PrefixSpec``) as every layer's prefix; ``cache`` (a transformers
        cache) is filled when given. Raises if a layer did not read the prefix (``what`` names it)."""
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep and self.accepts_logits_to_keep else {}
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=cache is not None,
                         **compat.cache_kwargs(self.model, cache), **{PREFIX_KWARG: spec}, **extra)
        spec.check_consumed(type(self.model).__name__, what)
        return out.logits

