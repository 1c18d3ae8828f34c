"""Backbones whose attention is hand-written (it bypasses transformers' attention interface, so
``set_attn_implementation("fastpeft")`` cannot reach it): fastpeft computes it through an instance patch of each of
their attention modules, undone by ``restore``.

Each family lives in its own module (``handwritten_<family>.py``) and registers a ``HandwrittenFamily`` here on
import; ``family_of`` imports them lazily (they import transformers' modeling code). A family's patch computes the
module's own attention math through ``fastpeft.prefix_attention`` (the family's extra score terms, if any, as the
kernels' ``attn_bias``), and returns what undoes it.
"""

import dataclasses
import importlib
from typing import Callable, Optional

_FAMILY_MODULES = ("handwritten_deberta", "handwritten_gptj")
_FAMILIES = []
_loaded = False


@dataclasses.dataclass(frozen=True)
class HandwrittenFamily:
    """How fastpeft computes one family's hand-written attention.

    name: the family as messages name it ("DeBERTa").
    matches: ``matches(model)`` for a transformers ``PreTrainedModel`` instance: whether this family's patch
        computes every attention module of ``model`` (the class, and its transformers release's code, is one the
        patch was checked against).
    prefix_refusal: ``prefix_refusal(model)``: None where a prefix-tuning prefix (the ``fastpeft_prefix`` keyword of
        the model's forward) reaches the patched attention, else the reason it cannot, as a sentence.
    patch: ``patch(model)`` switches every attention module of ``model`` to fastpeft and returns a picklable
        callable of no arguments (``functools.partial`` of a module function) that undoes exactly that. The
        patched modules must pickle and deep-copy too (accelerated models do).
    """

    name: str
    matches: Callable
    prefix_refusal: Callable
    patch: Callable


def register(family):
    """Add ``family`` (a ``HandwrittenFamily``) to the families ``family_of`` looks through (idempotent by name)."""
    if all(existing.name != family.name for existing in _FAMILIES):
        _FAMILIES.append(family)


def family_of(model) -> Optional[HandwrittenFamily]:
    """The ``HandwrittenFamily`` that computes ``model``'s hand-written attention (a ``PreTrainedModel`` instance),
    or None."""
    global _loaded
    if not _loaded:
        for name in _FAMILY_MODULES:
            importlib.import_module(f"{__package__}.{name}")
        _loaded = True
    for family in _FAMILIES:
        if family.matches(model):
            return family
    return None


class _Undo:
    """Undoes a ``patch``: calls the families' undo functions in reverse. A class (not a closure), and so must the
    families' undo functions be picklable (``functools.partial`` of module functions): accelerated models pickle and
    deep-copy."""

    def __init__(self, undos):
        self.undos = tuple(undos)

    def __call__(self):
        for undo_family in reversed(self.undos):
            undo_family()


def patch(model):
    """Switch the hand-written attention of every sub-model of ``model`` (a ``PreTrainedModel``) that needs it to
    fastpeft, each family once. Returns a picklable callable of no arguments that undoes it (a no-op where nothing
    was patched). Models on the attention interface are left to ``set_attn_implementation``."""
    from . import compat

    families = []
    for module in model.modules():
        if compat.is_pretrained_model(module) and not compat.uses_attention_interface(module):
            family = family_of(module)
            if family is not None and family not in families:
                families.append(family)
    return _Undo(family.patch(model) for family in families)
