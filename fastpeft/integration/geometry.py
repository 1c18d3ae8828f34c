"""The attention layout of a transformers model, read from its configuration: what a prompt-learning adapter must
have been trained for and what fastpeft's prefix tables are shaped by."""

from dataclasses import dataclass
from typing import Optional

from .compat import ConfigReadError, config_attribute, layer_attribute_values


@dataclass(frozen=True)
class BaseGeometry:
    """The attention layout of a decoder: what an adapter must have been trained for.

    ``num_kv_heads`` and ``head_dim`` are None where they differ between layers (transformers' per-layer
    configurations: Gemma 4's sliding-window and full-attention layers have different head sizes); then
    ``layer_kv_shapes`` holds ``(num_kv_heads, head_dim)`` of each layer. Only PEFT's prefix tuning of Gemma models
    handles such a layout (``fastpeft.accelerate``: a prefix sized for the largest layer, sliced per layer); whatever
    needs one layout for every layer calls ``require_uniform``."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: Optional[int]
    head_dim: Optional[int]
    layer_kv_shapes: Optional[tuple] = None

    @classmethod
    def of(cls, model_config):
        """From a transformers config (the text config of a multimodal model). Raises ``ValueError`` naming an
        attribute the configuration lacks or cannot give (``compat.config_attribute``), never the configuration's
        own exception."""
        config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config

        def required(name):
            value = config_attribute(config, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"the model configuration ({type(config).__name__}) gives no positive integer "
                                 f"{name} (got {value!r}); fastpeft reads the attention layout from it")
            return value

        layers, hidden, heads = required("num_hidden_layers"), required("hidden_size"), required("num_attention_heads")
        try:
            kv_heads = config_attribute(config, "num_key_value_heads") or heads
            head_dim = config_attribute(config, "head_dim") or hidden // heads
            return cls(layers, hidden, heads, kv_heads, head_dim)
        except ConfigReadError as error:
            if not error.per_layer:
                raise
        kv_heads = layer_attribute_values(config, "num_key_value_heads")
        head_dims = layer_attribute_values(config, "head_dim")
        if kv_heads is None or head_dims is None or len(kv_heads) != layers:
            raise ValueError(f"the model configuration ({type(config).__name__}) gives its attention layout per "
                             "layer, and fastpeft cannot read every layer's KV heads and head size")
        shapes = tuple((k or heads, d or hidden // heads) for k, d in zip(kv_heads, head_dims))
        return cls(layers, hidden, heads, None, None, shapes)

    def require_uniform(self, user):
        """Raise ``ValueError`` naming ``user`` unless every layer has the same KV heads and head size."""
        if self.layer_kv_shapes is not None:
            shapes = ", ".join(f"{k}x{d}" for k, d in self.layer_kv_shapes)
            raise ValueError(f"{user} needs one attention layout for every layer; this model's layers differ "
                             f"(KV heads x head size per layer: {shapes})")
