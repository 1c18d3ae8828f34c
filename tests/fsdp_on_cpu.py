"""Take accelerate's FSDP2 path on CPU processes (gloo), for tests.

accelerate turns an FSDP plugin (``Accelerator(fsdp_plugin=...)``, ``ACCELERATE_USE_FSDP=true`` from ``accelerate
launch --config_file`` with ``distributed_type: FSDP``, or transformers' ``TrainingArguments(fsdp=...)``) into
``DistributedType.FSDP`` only on accelerator devices (CUDA, XPU, NPU, ...): on CPU processes it quietly keeps
``MULTI_CPU`` and wraps the model in DistributedDataParallel instead. ``allow_fsdp_on_cpu()`` makes a CPU process keep
the plugin, so that accelerate and transformers' Trainer run their FSDP2 code (``fully_shard`` of the layers and the
root, FSDP checkpoints, ``get_state_dict``) on this machine, as they run it on GPUs. Call it before the first
``Accelerator``/``Trainer`` is made. ``FASTPEFT_TEST_FSDP_ON_CPU=1`` makes ``tests/fsdp_accelerate_script.py`` call it.
"""


def allow_fsdp_on_cpu():
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = self.distributed_type

    state.AcceleratorState.__init__ = init
