"""What ``accelerate`` keeps on an accelerated model: the marker attributes and the backbone facts found once per
model (position scheme, KV sharing, checkpointable modules).
"""

from .. import compat

# accelerate() keeps the model's AccelerationState under this instance attribute; its presence marks the model as
# accelerated.
STATE_ATTR = "_fastpeft_acceleration"
# Set instead of STATE_ATTR when accelerate() left the model on PEFT's path: the reason, as the warning gave it.
FALLBACK_ATTR = "_fastpeft_fallback"


class AccelerationState:
    """What ``restore`` needs (the backbone's previous attention implementation, the hand-written patch's undo),
    and the backbone facts the accelerated methods find at their first call."""

    def __init__(self, previous_attn_implementation, undo_handwritten, hooks=()):
        self.previous_attn_implementation = previous_attn_implementation
        self.undo_handwritten = undo_handwritten  # handwritten.patch's undo (hand-written attention)
        self.hooks = list(hooks)  # handles of the module hooks accelerate registered on the model (restore removes)
        self.position_scheme = None  # compat.position_scheme of the backbone, found at the first forward
        self.decoder_layers = None  # an encoder-decoder's decoder layer count, found at the first prefix forward
        self.checkpointable = None  # the backbone's modules with a gradient_checkpointing flag, ditto
        self.kv_sharing_sources = None  # compat.kv_sharing_sources of the backbone, ditto


def position_scheme(peft_model):
    """The backbone's ``compat.position_scheme``, found once per accelerated model."""
    state = getattr(peft_model, STATE_ATTR)
    if state.position_scheme is None:
        state.position_scheme = compat.position_scheme(peft_model.get_base_model())
    return state.position_scheme


def kv_sharing_sources(peft_model):
    """The backbone's ``compat.kv_sharing_sources``, found once per accelerated model (the modules keep it)."""
    state = getattr(peft_model, STATE_ATTR)
    if state.kv_sharing_sources is None:
        state.kv_sharing_sources = compat.kv_sharing_sources(peft_model.get_base_model())
    return state.kv_sharing_sources


def checkpointable_modules(peft_model):
    """The backbone's modules that carry a ``gradient_checkpointing`` flag, found once per accelerated model.
    transformers only ever sets the flag (and the checkpoint function) on modules that have it already, so the set
    is fixed; reading their flags costs a few microseconds per forward, walking every module ~0.1 ms."""
    state = getattr(peft_model, STATE_ATTR)
    if state.checkpointable is None:
        state.checkpointable = tuple(module for module in peft_model.get_base_model().modules()
                                     if hasattr(module, "gradient_checkpointing"))
    return state.checkpointable
