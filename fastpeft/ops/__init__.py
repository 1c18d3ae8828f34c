"""Prefix attention: the public functions, the backend registry and the PyTorch reference.

* ``prefix_attention`` (also ``fastpeft.prefix_attention``) and ``prefix_attention_prevalidated`` (the model
  integrations' entry: values checked once per forward, one plan for the layers' calls);
* ``paged_prefix_decode``: one decode step over a paged KV cache (a block pool read through per-row block tables);
* ``reference_prefix_attention``: the PyTorch reference (differentiable, with attention dropout), the tests' oracle;
* ``backend_table``: which backends run here, in dispatch order, and why the others do not.

Layers: ``arguments`` (validation into the canonical form), ``registry`` (the dispatch order), ``library`` (the
``torch.library`` custom ops), ``backends/`` (one module per backend, one host contract), ``masks`` and
``prefix_table`` (the visibility rules and the per-row reads of the prefix table, once), ``block_table`` (the reads
of a paged KV cache, once).
"""

from .paged_decode import paged_prefix_decode
from .prefix_attention import prefix_attention, prefix_attention_prevalidated
from .reference import reference_prefix_attention
from .registry import backend_table

__all__ = ["prefix_attention", "prefix_attention_prevalidated", "paged_prefix_decode", "reference_prefix_attention",
           "backend_table"]
