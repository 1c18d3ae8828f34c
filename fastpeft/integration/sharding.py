"""Prefix tuning and prompt tuning of a backbone sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

The fused attention runs unchanged inside sharded decoder layers; what sharding changes is everything around it.
FSDP2 replaces every parameter it manages by a ``DTensor`` holding this process's shard, gathered only inside the
forward of the module that owns it. So the prompt encoder's parameters cannot be read outside a forward (PEFT's
``save_pretrained`` runs the encoder on them and fails with "got mixed torch.Tensor and DTensor", and it ignores a
``state_dict`` passed for prompt learning), and a trainable parameter left outside every ``fully_shard`` unit has
its gradient reduced by nobody: each process would train its own prompt on its own rows.

- ``shard(model)``: ``fully_shard`` on every decoder layer (the model's ``_no_split_modules`` classes), then on the
  whole model, whose group then holds the prompt encoders, the embeddings and the head; then ``check_sharded``.
  Takes an accelerated ``PeftModel`` or a bare transformers model (``MultiPrefixTrainer``'s backbone).
- ``check_sharded(model)``: ``UnshardedParameterError`` naming every trainable parameter that a multi-process run
  would leave without a reduced gradient. An accelerated model's training forward checks it too, so a wrap made by
  hand, by ``transformers.Trainer`` or by ``accelerate`` is checked as well.
- ``save_pretrained(peft_model, directory)``: every process calls it; the prompt parameters alone are gathered
  (never the backbone), or read from the full ``state_dict`` transformers' Trainer passes, and rank 0 writes the
  directory PEFT's ``save_pretrained`` writes (``adapter_config.json``, ``adapter_model.safetensors`` with
  ``prompt_embeddings``), loadable by ``PeftModel.from_pretrained``. An accelerated model's own ``save_pretrained``
  comes here while it is sharded.
- ``load_adapter(peft_model, directory)``: resume training from such a directory: every process reads it and keeps
  its own shard.
- ``full_parameters(module)``, ``encoder_output(encoder, tokens)``: a module's parameters as full tensors, an encoder's
  output on them (collectives: every process calls them).
- ``average_gradients`` / ``broadcast_parameters``: for parameters kept replicated beside a sharded backbone
  (``MultiPrefixTrainer``'s prefix tables), what DistributedDataParallel would do for them.
- ``leave_out_embedding_alias(peft_model)``: the state-dict hooks ``fastpeft.accelerate`` installs so that
  ``transformers.Trainer`` resumes a sharded PEFT model from its checkpoints.
"""

import copy
import os

import torch

from ..adapters import EMBEDDINGS_KEY, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, SAFETENSORS_FILE, load_prompt_adapter

__all__ = ["UnshardedParameterError", "shard", "is_sharded", "check_sharded", "full_parameters", "encoder_output",
           "save_pretrained", "load_adapter", "average_gradients", "broadcast_parameters", "leave_out_embedding_alias"]

# PEFT types whose saved tensor is the prompt encoder's output on its virtual-token ids.
_SAVABLE_TYPES = (PREFIX_TUNING, PROMPT_TUNING, P_TUNING)


class UnshardedParameterError(ValueError):
    """A trainable parameter of a model sharded with FSDP2 is outside every ``fully_shard`` unit: no process would
    reduce its gradient, so each would train its own copy on its own rows."""


def _world_size():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _rank():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _is_dtensor(tensor):
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(module):
    """Whether ``module`` or one of its submodules went through ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _layer_class_names(model):
    """The decoder-layer classes of the transformers model in ``model``: its ``_no_split_modules`` (what accelerate's
    transformer wrap policy and ``device_map`` treat as a layer), those present in the model."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            present = {type(m).__name__ for m in model.modules()}
            return [name for name in names if name in present]
    return []


def shard(model, *, mp_policy=None, reshard_after_forward=True, mesh=None, offload_policy=None):
    """Shard ``model`` with FSDP2: ``fully_shard`` on each decoder layer, then on ``model`` itself.

    Arguments:
        model: an accelerated ``PeftModel`` (call ``fastpeft.accelerate`` first; the root group then holds its
            prompt encoders), or a transformers ``PreTrainedModel`` (e.g. the backbone given to
            ``MultiPrefixTrainer``, which keeps its prefix tables replicated and averages their gradients itself).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. ``param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32``); default: compute in the parameters' dtype.
        reshard_after_forward, mesh, offload_policy: passed to every ``fully_shard`` call.

    A process group must be initialised. Create optimizers afterwards: ``fully_shard`` replaces the parameters.
    Returns ``model`` (sharded in place). Raises ValueError for a model without decoder-layer classes
    (``_no_split_modules``) and ``UnshardedParameterError`` (``check_sharded``).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("shard needs an initialised process group (torch.distributed.init_process_group)")
    names = _layer_class_names(model)
    if not names:
        raise ValueError(f"shard finds no decoder-layer classes (_no_split_modules) in {type(model).__name__}; "
                         "call fully_shard on its layers, then on the model, yourself")
    kwargs = dict(mp_policy=mp_policy or MixedPrecisionPolicy(), reshard_after_forward=reshard_after_forward,
                  mesh=mesh)
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    for module in [m for m in model.modules() if type(m).__name__ in names]:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    check_sharded(model)
    return model


def check_sharded(model, parameters=None):
    """Raise ``UnshardedParameterError`` when ``model`` is sharded (``is_sharded``), runs in more than one process,
    and a trainable parameter (of ``parameters``, ``(name, tensor)`` pairs named from ``model``; default all of
    ``model``'s) belongs to no ``fully_shard`` unit (neither its module nor any module above it up to ``model`` went
    through ``fully_shard``): its gradient would stay this process's own. Call ``fully_shard`` on the whole model
    last, as ``shard`` does. Cheap enough for every training forward: it walks the named parameters' module paths."""
    if _world_size() == 1 or not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    named = model.named_parameters() if parameters is None else parameters
    loose = []
    for name, param in named:
        if not param.requires_grad:
            continue
        path, module, managed = name.split(".")[:-1], model, isinstance(model, FSDPModule)
        for part in path:
            if managed:
                break
            module = getattr(module, part)
            managed = isinstance(module, FSDPModule)
        if not managed:
            loose.append(name)
    if loose:
        raise UnshardedParameterError(
            f"{type(model).__name__} is sharded with FSDP2 but its trainable parameters {loose} are outside every "
            f"fully_shard unit: no process would reduce their gradients, so each of the {_world_size()} processes "
            "would train its own copy on its own rows. Call fully_shard on the whole model after its layers "
            "(fastpeft.integration.sharding.shard does)")


def leave_out_embedding_alias(peft_model):
    """Under FSDP2, leave PEFT's second name of the backbone's input embeddings out of ``peft_model``'s state dict.

    A prompt-learning ``PeftModel`` registers the backbone's input embeddings again as ``word_embeddings``.
    ``torch.distributed.checkpoint``'s full state dict of a sharded model keeps that second name although it is
    frozen (``ignore_frozen_params`` drops one name per parameter), while loading one leaves it out: a
    ``transformers.Trainer`` under FSDP2 saves checkpoints its ``resume_from_checkpoint`` then fails on
    (``KeyError: 'word_embeddings.weight'``). While the model is sharded its state dict holds the tensor under the
    backbone's name only, and loading does not count the alias as missing. Returns the two hook handles (``remove()``
    them to undo); ``fastpeft.accelerate`` installs them."""
    return [peft_model.register_state_dict_post_hook(_drop_embedding_alias),
            peft_model.register_load_state_dict_post_hook(_embedding_alias_is_not_missing)]


_EMBEDDING_ALIAS = "word_embeddings."  # PEFT's second name of the backbone's input embeddings


# Module-level hooks (not closures): an accelerated model pickles and deep-copies with them.
def _drop_embedding_alias(module, state_dict, prefix, local_metadata):
    if is_sharded(module):
        for key in [key for key in state_dict if key.startswith(prefix + _EMBEDDING_ALIAS)]:
            del state_dict[key]


def _embedding_alias_is_not_missing(module, incompatible_keys):
    if is_sharded(module):
        incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys
                                             if not ("." + key).partition("." + _EMBEDDING_ALIAS)[1]]


def full_parameters(module):
    """``{name: tensor}`` of ``module``'s parameters, each whole: a ``DTensor`` shard is gathered
    (``full_tensor()``), a plain tensor taken as it is; detached. Every process must call it (the gathers are
    collective), in the same order."""
    gathered = {}
    for name, param in module.named_parameters():
        tensor = param.detach()
        gathered[name] = tensor.full_tensor() if _is_dtensor(tensor) else tensor
    return gathered


def encoder_output(encoder, tokens):
    """``encoder(tokens)`` computed on ``encoder``'s gathered parameters (``full_parameters``), without gradients:
    what a prompt encoder saves, readable outside a sharded forward. Every process must call it."""
    from torch.func import functional_call

    parameters = full_parameters(encoder)
    tokens = tokens.to(next(iter(parameters.values())).device)
    with torch.no_grad():
        return functional_call(encoder, parameters, (tokens,)).detach()


def _prompt_embeddings(peft_model, adapter_name, state_dict=None):
    """What PEFT's ``get_prompt_embedding_to_save`` returns: the encoder on the adapter's virtual-token ids (prefix
    tuning: the first P), one row, on CPU. Its parameters come from ``state_dict`` (full tensors keyed as the model's
    own, as ``transformers.Trainer`` hands a sharded model's to ``save_pretrained``) when it holds them, else from the
    encoder, gathered when FSDP2 sharded them (then every process must call it)."""
    from torch.func import functional_call

    config = peft_model.peft_config[adapter_name]
    encoder = peft_model.prompt_encoder[adapter_name]
    tokens = peft_model.prompt_tokens[adapter_name].unsqueeze(0)
    if _peft_type(config) == PREFIX_TUNING:
        tokens = tokens[:, :config.num_virtual_tokens]
    prefix = f"prompt_encoder.{adapter_name}."
    names = [name for name, _ in encoder.named_parameters()]
    if state_dict is not None and all(prefix + name in state_dict for name in names):
        parameters = {name: state_dict[prefix + name] for name in names}
        with torch.no_grad():
            output = functional_call(encoder, parameters, (tokens.to(parameters[names[0]].device),))
    else:
        output = encoder_output(encoder, tokens)
    return output[0].detach().to("cpu")


def average_gradients(parameters):
    """Average the gradients of ``parameters`` (replicated, the same on every process, in the same order) over the
    processes, in one ``all_reduce``; a parameter without a gradient counts as zero, and keeps None only if it has
    none on every process. A no-op in one process. (``MultiPrefixTrainer`` keeps its prefix tables replicated beside
    a sharded backbone and averages their gradients with this, as DistributedDataParallel would.)"""
    world = _world_size()
    parameters = list(parameters)
    if world == 1 or not parameters:
        return
    reference = parameters[0]
    flags = torch.tensor([p.grad is not None for p in parameters], dtype=reference.dtype, device=reference.device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters]
                     + [flags])
    torch.distributed.all_reduce(flat)
    grads, flags = flat[:-len(parameters)], flat[-len(parameters):]
    for param, chunk, flag in zip(parameters, grads.split([p.numel() for p in parameters]), flags.tolist()):
        param.grad = (chunk / world).view_as(param) if flag else None


def broadcast_parameters(parameters, src=0):
    """Copy rank ``src``'s values of ``parameters`` (replicated, same order everywhere) to every process."""
    if _world_size() == 1:
        return
    with torch.no_grad():
        for param in parameters:
            torch.distributed.broadcast(param.data, src)


def _peft_type(config):
    return getattr(config.peft_type, "value", config.peft_type)


def save_pretrained(peft_model, directory, selected_adapters=None, state_dict=None, is_main_process=None):
    """Write the adapters of a (sharded) ``PeftModel`` as PEFT's ``save_pretrained`` does: ``directory`` for the
    adapter ``"default"``, ``directory/<name>`` for another; ``adapter_config.json`` (``inference_mode`` true) and
    ``adapter_model.safetensors`` holding ``prompt_embeddings`` (prefix tuning with projection: the MLP's output).

    Only the prompt parameters are gathered, never the backbone. With ``state_dict`` holding them whole (what
    ``transformers.Trainer`` passes with a full state dict) nothing is gathered; otherwise parameters that FSDP2
    sharded are gathered, and every process must call it (parameters left unsharded, e.g. after ``unshard()``, need
    no other process). ``is_main_process`` (default: rank 0) writes. An accelerated model's own
    ``save_pretrained`` comes here when it is sharded. Raises ValueError for an unknown adapter or one that is not
    prefix tuning, prompt tuning or p-tuning, and for ``directory`` naming a file.
    """
    from safetensors.torch import save_file

    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)
    for name in names:
        if name not in peft_model.peft_config:
            raise ValueError(f"selected_adapters: the model has no adapter {name!r} (it has "
                             f"{sorted(peft_model.peft_config)})")
        if _peft_type(peft_model.peft_config[name]) not in _SAVABLE_TYPES:
            raise ValueError(f"adapter {name!r} is {_peft_type(peft_model.peft_config[name])}; save_pretrained "
                             f"writes {', '.join(_SAVABLE_TYPES)}")
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"{directory} is a file; save_pretrained writes a directory")
    writes = _rank() == 0 if is_main_process is None else is_main_process
    for name in names:
        if not writes and state_dict is not None:
            continue  # a full state dict lives on the writing process only: nothing to gather here
        embeddings = _prompt_embeddings(peft_model, name, state_dict)
        if not writes:
            continue
        target = directory if name == "default" else os.path.join(directory, name)
        os.makedirs(target, exist_ok=True)
        save_file({EMBEDDINGS_KEY: embeddings.contiguous()}, os.path.join(target, SAFETENSORS_FILE),
                  metadata={"format": "pt"})
        config = copy.deepcopy(peft_model.peft_config[name])
        config.inference_mode = True
        config.save_pretrained(target)


def load_adapter(peft_model, directory, adapter_name="default"):
    """Resume training adapter ``adapter_name`` of a (sharded) ``PeftModel`` from a directory ``save_pretrained``
    (or PEFT) wrote: its ``prompt_embeddings`` become the encoder's embedding table; each process keeps its shard.

    PEFT itself refuses ``PeftModel.from_pretrained(..., is_trainable=True)`` for prompt learning; this is the
    resume path. Only encoders whose saved tensor is their parameter take it: prefix tuning without projection and
    prompt tuning. A prefix-tuning adapter trained with ``prefix_projection`` or a p-tuning adapter saves its MLP's
    output, from which the MLP cannot be recovered: resume those from a training checkpoint (Trainer's, or
    ``torch.distributed.checkpoint``), or load the directory with ``PeftModel.from_pretrained`` as a plain table.
    Raises ValueError for those, another PEFT type or a shape that does not fit.
    """
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"adapter_name: the model has no adapter {adapter_name!r} (it has "
                         f"{sorted(peft_model.peft_config)})")
    config = peft_model.peft_config[adapter_name]
    saved = load_prompt_adapter(directory)
    if saved.peft_type != _peft_type(config):
        raise ValueError(f"{directory} holds a {saved.peft_type} adapter; adapter {adapter_name!r} is "
                         f"{_peft_type(config)}")
    encoder = peft_model.prompt_encoder[adapter_name]
    if _peft_type(config) not in (PREFIX_TUNING, PROMPT_TUNING) or getattr(encoder, "transform", None) is not None:
        raise ValueError(f"{directory}: a {saved.peft_type} adapter with a projection MLP is saved as the MLP's "
                         "output, which cannot restore the MLP; resume it from a training checkpoint, or load it with "
                         "PeftModel.from_pretrained as a plain table")
    weight = encoder.embedding.weight
    if tuple(saved.embeddings.shape) != tuple(weight.shape):
        raise ValueError(f"{directory}: {EMBEDDINGS_KEY} has shape {tuple(saved.embeddings.shape)}, adapter "
                         f"{adapter_name!r} holds {tuple(weight.shape)}")
    values = saved.embeddings.to(dtype=weight.dtype)
    with torch.no_grad():
        if _is_dtensor(weight):
            from torch.distributed.tensor import distribute_tensor

            # Every process read the same file: each cuts its own shard, no communication.
            shard_of_values = distribute_tensor(values.to(weight.device_mesh.device_type), weight.device_mesh,
                                                weight.placements, src_data_rank=None)
            weight.to_local().copy_(shard_of_values.to_local())
        else:
            weight.copy_(values.to(weight.device))
