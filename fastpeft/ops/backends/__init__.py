"""The backends of prefix attention, one module each, all implementing ``base.Backend``'s host contract: ``cuda``
(the CUDA extension's decode), ``triton`` (the Triton kernels), ``sdpa`` (PyTorch's fused attention ops, with
``sdpa_short`` for small problems on CPU and ``aten_attention`` the private aten ops behind one interface) and
``reference`` (the PyTorch reference). ``fastpeft.ops.registry`` orders them and chooses."""
