"""Triton device code and launch helpers (the folder ``fastpeft_kernels/``, installed as ``fastpeft.kernels``).

* ``prefix_attention``: the launchers of the training/prefill kernels (``prefix_attention_fwd``/``_bwd``);
  ``forward`` and ``backward`` hold those kernels, ``blocks`` their shared device helpers, ``configs`` their
  autotuning;
* ``prefix_decode``: the launcher of the decode kernels (one query per row, no gradient) in ``decode``;
* ``common``: device helpers of every kernel, and ``INTERPRETING`` (``TRITON_INTERPRET=1`` when they were decorated).

Importing this package does not import Triton; each kernel module does, when first used.
"""
