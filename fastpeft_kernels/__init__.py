"""Triton device code and launch helpers (the folder ``fastpeft_kernels/``, installed as ``fastpeft.kernels``).

Importing this package does not import Triton; each kernel module does, when first used.
"""
