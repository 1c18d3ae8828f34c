"""``fastpeft.accelerate`` / ``fastpeft.restore``: PEFT prompt-learning models on fastpeft's fused attention.

``accelerate(peft_model)`` makes instance-level, undoable changes only (no class or module is patched):

* the backbone's ``attn_implementation`` becomes ``"fastpeft"`` (see ``fastpeft.integration.attention``), so
  attention runs through ``fastpeft.prefix_attention`` with the 2-D key padding mask handled in the kernels;
* for prefix tuning, the instance gets its own ``forward`` and (causal LMs) ``generate``. The prompt encoder runs
  once per call on ``arange(P)`` (not once per row), its output is split into per-layer ``[Hkv, P, D]`` prefix K/V
  and handed to every attention call as the ``fastpeft_prefix`` keyword. Nothing is expanded per row, nothing is
  copied into a KV cache, no 4-D mask is built, and gradients flow from the kernels' prefix gradient (the sum over
  the batch) back into the prompt encoder;
* prompt tuning and p-tuning keep PEFT's own forward (the virtual tokens are input embeddings there, so PEFT's
  semantics come for free; only attention changes); their ``generate`` runs the virtual tokens through the
  backbone once and serves their K/V as a shared prefix, like prefix tuning's;
* hand-written attention of a family in ``handwritten`` (DeBERTa's disentangled attention; GPT-J's on transformers
  5.17) is computed through an instance patch of its attention modules (``handwritten.patch``), which ``restore``
  undoes;
* a backbone whose attention fastpeft cannot compute (other hand-written attention such as Falcon's up to
  transformers 5.24, or a feature the kernels lack) is left untouched on PEFT's own path with a ``FallbackWarning``
  naming why (``strict=True`` raises); a layer whose attention turns out not to take its prefix at a call (it drops
  keyword arguments although its class declares that it passes them) makes that call raise
  (``attention.PrefixSpec.check_consumed``);
* PEFT's refusal of prefix tuning under gradient checkpointing (``_setup_prompt_encoder``, peft#869/#2191) is
  lifted for this instance: with the prefix outside the cache, checkpoint recomputation is correct.

PEFT's semantics are reproduced exactly (``/work/shared/PEFT_NOTES.md``): prefix keys per KV head and never
rotated; in ``forward`` the real tokens get the positions the backbone gives them after a cache of P tokens
(``P .. P+L-1`` whatever the padding for most models; OPT and RoBERTa count pad-aware, see
``causal._prefix_position_ids``; user ``position_ids`` get ``+P``); in ``generate`` positions are pad-aware,
``cumsum(mask) - 1 + P``.

The modules, by concern: ``api`` (``accelerate``, ``restore``, ``FallbackWarning``), ``checks`` (what a model,
adapter or call must satisfy), ``state`` (what ``accelerate`` keeps on the model), ``prefix`` (the ``PrefixSpec``
built from an adapter), ``causal`` (the forward of one-stack models), ``seq2seq`` (the encoder-decoder forward) and
``generation`` (both ``generate`` methods).
"""

from .api import FallbackWarning, accelerate, fallback_reason, is_accelerated, restore
from .prefix import encoder_decoder_prefix_spec, prefix_spec

__all__ = ["FallbackWarning", "accelerate", "encoder_decoder_prefix_spec", "fallback_reason", "is_accelerated",
           "prefix_spec", "restore"]
