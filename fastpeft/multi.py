"""Training many prefix-tuning adapters together on one frozen backbone: mixed-tenant batches.

PEFT keeps one active prompt-learning adapter per model, so tuning one prefix per task or customer costs one run
each. ``MultiPrefixTrainer`` holds N prefix-tuning adapters (with or without ``prefix_projection``, each with its own
number of virtual tokens) on one frozen causal LM and trains them from batches whose rows belong to different
adapters. Each step builds, differentiably, one prefix table per layer from the adapters present in the batch;
the fused prefix attention reads row b's prefix through ``prefix_index`` and its backward hands every table entry
the gradient summed over the rows that used it, so each adapter receives exactly the gradient of its own rows.

Usage::

    from peft import PrefixTuningConfig
    import fastpeft

    trainer = fastpeft.MultiPrefixTrainer(base_model, lr=1e-2)           # base_model: a transformers causal LM
    trainer.add_adapter("support", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
    trainer.add_adapter("legal", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=32,
                                                    prefix_projection=True, encoder_hidden_size=512))
    trainer.add_adapter("sales", "path/to/peft_prefix_adapter")          # continue a saved PEFT adapter
    records = [{"task": "support", "input_ids": [...], "labels": [...]}, {"task": "legal", "input_ids": [...]}, ...]
    trainer.train(records, batch_size=16, epochs=3)
    trainer.save_pretrained("out/")                                      # out/support, out/legal, out/sales

    # each directory loads in plain PEFT: PeftModel.from_pretrained(base_model, "out/legal")

Semantics per row are PEFT's prefix tuning (``PEFT_NOTES.md``): the prefix is stored per KV head and never rotated;
the real tokens of a row of adapter t sit at positions ``P_t .. P_t+L-1`` (``arange(L) + P_t``, not pad-aware, as in
PEFT's ``forward``); the loss is the causal-LM loss (labels shifted by one inside, ``-100`` ignored).

Loss. PEFT averages the token losses over the whole batch. Here each adapter's loss is the mean over the labelled
tokens of its own rows, and the loss that is back-propagated is their sum::

    loss = sum over adapters t present in the batch of  (sum of token losses of t's rows) / (labelled tokens of t)

so the gradient each adapter receives is exactly the gradient PEFT computes for that adapter on a batch made of its
own rows, whatever the other rows are. Under DistributedDataParallel the token counts are summed over processes
first, so the gradients equal those of one process holding the whole global batch.

Optimisation. Every adapter has its own optimizer (AdamW by default), and optional scheduler and gradient clipping.
An adapter whose rows carry no labelled token in a step (over all processes) is not stepped at all: its
parameters, its optimizer state (Adam's moments and step count) and its learning-rate schedule are untouched, and
decoupled weight decay is not applied to it. A tenant's training therefore equals training it alone on the
sub-sequence of batches that contain it.
"""

import copy
import os
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .adapters import EMBEDDINGS_KEY, PREFIX_TUNING, SAFETENSORS_FILE, split_prefix
from .integration.geometry import BaseGeometry
from .data import IGNORE_INDEX, right_pad

MIXED_PRECISION = {None: None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MultiPrefixOutput:
    """Result of ``MultiPrefixTrainer.forward``.

    logits: ``[B, L, vocab]`` of the input's positions (no virtual-token positions), as PEFT's prefix tuning returns.
    loss: scalar to back-propagate (None without labels): the sum over adapters of each adapter's mean token loss
        (see the module docstring). Under DistributedDataParallel it is this process's share, scaled so that the
        gradient averaging of DDP yields the gradient of the global loss.
    adapter_losses: name -> mean token loss (a float) of that adapter's rows, over all processes; only adapters with
        labelled tokens. Their sum is the combined loss.
    token_counts: name -> number of labelled tokens (after the shift) of every adapter, summed over all processes.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    adapter_losses: Optional[Dict[str, float]] = None
    token_counts: Optional[Dict[str, int]] = None


@dataclass
class _Tenant:
    """One adapter: its PEFT config (``PrefixTuningConfig``), its PEFT ``PrefixEncoder`` and its own optimizer."""

    config: object
    encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Optional[object]
    updates: int = 0

    @property
    def num_virtual_tokens(self):
        return int(self.config.num_virtual_tokens)


def _encoder_output(encoder, num_virtual_tokens):
    """The prefix of a PEFT ``PrefixEncoder``, ``[P, num_layers * 2 * Hkv * head_dim]`` fp32.

    With a projection MLP (present only when the adapter was created for training with ``prefix_projection``) it is
    the MLP applied to the P virtual-token embeddings, computed once per step rather than once per row as PEFT does
    (the same values; the gradient of the shared output is the sum over rows). Otherwise the embedding table itself,
    which is what PEFT's ``embedding(arange(P))`` returns."""
    if getattr(encoder, "transform", None) is not None:
        tokens = torch.arange(num_virtual_tokens, device=encoder.embedding.weight.device)
        return encoder.transform(encoder.embedding(tokens))
    return encoder.embedding.weight


class _PrefixTables(torch.nn.Module):
    """Holds every adapter's prefix encoder; ``forward`` builds the per-layer prefix tables of some of them.

    It is the only module with trainable parameters, so it is what DistributedDataParallel wraps: the frozen
    backbone runs outside DDP and the table tensors carry the gradients back into the encoders."""

    def __init__(self, num_layers, num_kv_heads, head_dim):
        super().__init__()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.encoders = torch.nn.ModuleList()

    def forward(self, slots, lengths, dtype):
        """slots: indices into ``encoders``, one per table entry; lengths: their virtual-token counts.

        Returns (keys, values): one ``[T, Hkv, Pmax, D]`` tensor per layer, in ``dtype``, entry t zero-padded after
        ``lengths[t]``. PEFT's layout: the encoder output viewed as ``[P, 2 * num_layers, Hkv, D]``, slot 2i is layer
        i's keys and 2i+1 its values."""
        p_max = max(lengths)
        flats = [F.pad(_encoder_output(self.encoders[slot], length).to(dtype), (0, 0, 0, p_max - length))
                 for slot, length in zip(slots, lengths)]
        return split_prefix(torch.stack(flats), self.num_layers, self.num_kv_heads, self.head_dim)


def _field(record, name):
    """``record[name]`` for mappings, ``record.name`` for objects (e.g. dataclasses); None when absent."""
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _distributed():
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class MultiPrefixTrainer:
    """Train N PEFT prefix-tuning adapters together on one frozen causal LM (see the module docstring).

    Arguments:
        model: a transformers causal LM (``PreTrainedModel``; full precision or loaded in 4/8 bit through
            bitsandbytes), not a ``PeftModel``. Its parameters are frozen (``requires_grad_(False)``) and it is
            switched to the ``"fastpeft"`` attention implementation; ``restore_model()`` switches it back.
        lr, weight_decay: of the default optimizer, ``torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)``.
        optimizer_factory: ``callable(params) -> torch.optim.Optimizer``, called once per adapter with that
            adapter's parameters (overrides lr/weight_decay).
        scheduler_factory: ``callable(optimizer) -> lr scheduler``, called once per adapter; a scheduler is stepped
            right after its optimizer, so it counts that adapter's updates, not global steps.
        max_grad_norm: clip each adapter's gradient norm (per adapter) before its update; None = no clipping.
        gradient_checkpointing: enable activation checkpointing on the backbone (non-reentrant, which keeps the
            prefix tables, passed as keyword arguments, in the recomputed graph). PEFT refuses this for prefix
            tuning; here it gives the same gradients.
        mixed_precision: None (the backbone's dtype), ``"bf16"`` or ``"fp16"``: the forward runs under
            ``torch.autocast`` of the model's device type; ``"fp16"`` also scales the loss with a ``GradScaler``.
            Adapter parameters and optimizer states stay float32.

    Under ``torch.distributed`` (a process group initialised before the first step) the adapters' encoders are
    wrapped in ``DistributedDataParallel`` (rank 0's initial values are broadcast) and token counts are summed over
    processes; every process must call each training step, and every forward with gradients must be followed by a
    backward, as usual with DDP.
    """

    def __init__(self, model, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimizer_factory: Optional[Callable] = None, scheduler_factory: Optional[Callable] = None,
                 max_grad_norm: Optional[float] = None, gradient_checkpointing: bool = False,
                 mixed_precision: Optional[str] = None):
        from peft import PeftModel

        from .integration.attention import check_supported_model, use_fastpeft_attention
        from .integration.compat import warn_if_untested

        if isinstance(model, PeftModel):
            raise ValueError("model must be the base transformers model, not a PeftModel: add PEFT adapters with "
                             "add_adapter(name, peft_model)")
        if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
            raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("MultiPrefixTrainer trains prefixes of decoder-only causal LMs; "
                             f"{type(model).__name__} is an encoder-decoder model")
        check_supported_model(model, "MultiPrefixTrainer")
        warn_if_untested("MultiPrefixTrainer")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of None, 'bf16', 'fp16', got {mixed_precision!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")

        # The layout the kernels read a prefix in (PEFT sizes a prefix per KV head): adapters must match it.
        geometry = BaseGeometry.of(model.config)
        geometry.require_uniform("MultiPrefixTrainer")
        self.num_layers, self.num_kv_heads, self.head_dim = (geometry.num_layers, geometry.num_kv_heads,
                                                             geometry.head_dim)
        self.token_dim = self.num_kv_heads * self.head_dim

        self.model = model
        self.device = next(model.parameters()).device
        model.requires_grad_(False)
        self._previous_attn_implementation = use_fastpeft_attention(model)
        if gradient_checkpointing:
            from .integration.checkpointing import set_checkpointing

            set_checkpointing(model, True)

        self.autocast_dtype = MIXED_PRECISION[mixed_precision]
        self._scaler = (torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None)
        self._optimizer_factory = optimizer_factory or (
            lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
        self._scheduler_factory = scheduler_factory
        self.max_grad_norm = max_grad_norm

        self._tables = _PrefixTables(self.num_layers, self.num_kv_heads, self.head_dim)
        self._tenants: Dict[str, _Tenant] = {}
        self._slots: Dict[str, int] = {}   # name -> index in self._tables.encoders
        self._ddp = None                   # DistributedDataParallel over self._tables, rebuilt when adapters change

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> List[str]:
        """Adapter names, in the order they were added."""
        return list(self._tenants)

    def encoder(self, name):
        """The PEFT ``PrefixEncoder`` of adapter ``name`` (its parameters are the trainable ones)."""
        return self._tenant(name).encoder

    def config(self, name):
        """The PEFT ``PrefixTuningConfig`` of adapter ``name`` (what ``save_adapter`` writes, with
        ``inference_mode`` set there)."""
        return self._tenant(name).config

    def optimizer(self, name):
        """The optimizer of adapter ``name``."""
        return self._tenant(name).optimizer

    def updates(self, name) -> int:
        """How many optimizer steps adapter ``name`` has taken."""
        return self._tenant(name).updates

    def add_adapter(self, name: str, adapter, *, peft_adapter_name: Optional[str] = None,
                    allow_pickle: bool = False):
        """Add a prefix-tuning adapter called ``name`` (unique, non-empty).

        adapter is one of:
        - a ``peft.PrefixTuningConfig``: a new adapter initialised as PEFT's ``get_peft_model`` initialises it
          (PEFT's ``PrefixEncoder``; with ``prefix_projection`` the embedding + MLP are trained);
        - a path to a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``): training
          continues from the saved prefix. PEFT saves a projection adapter as the MLP's output, so such an adapter
          continues as a plain prefix table (as ``PeftModel.from_pretrained`` loads it). A pickle-only checkpoint
          (``adapter_model.bin``) is refused unless ``allow_pickle=True``;
        - a ``PeftModel`` with a prefix-tuning adapter (``peft_adapter_name``, default its active one): its prompt
          encoder is copied, projection MLP included when it has one.

        Raises ValueError for a duplicate name, an adapter that is not prefix tuning or whose layers, KV heads or
        head size do not match the model, and a directory without (safetensors) weights.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._tenants:
            raise ValueError(f"an adapter named {name!r} already exists")
        if peft_adapter_name is not None and not hasattr(adapter, "prompt_encoder"):
            raise ValueError("peft_adapter_name selects an adapter of a PeftModel")
        if isinstance(adapter, (str, os.PathLike)):
            config, encoder = self._load_directory(os.fspath(adapter), allow_pickle)
        elif hasattr(adapter, "prompt_encoder") and hasattr(adapter, "peft_config"):
            config, encoder = self._copy_peft_model(adapter, peft_adapter_name)
        elif getattr(adapter, "peft_type", None) is not None:
            config, encoder = self._create(adapter)
        else:
            raise ValueError("adapter must be a PrefixTuningConfig, a PEFT adapter directory or a PeftModel, got "
                             f"{type(adapter).__name__}")

        encoder = encoder.to(self.device)
        encoder.requires_grad_(True)
        params = list(encoder.parameters())
        optimizer = self._optimizer_factory(params)
        scheduler = self._scheduler_factory(optimizer) if self._scheduler_factory is not None else None
        self._slots[name] = len(self._tables.encoders)
        self._tables.encoders.append(encoder)
        self._tenants[name] = _Tenant(config, encoder, optimizer, scheduler)
        self._ddp = None

    def _check_config(self, config, source):
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        if peft_type != PREFIX_TUNING:
            raise ValueError(f"{source}: MultiPrefixTrainer trains prefix tuning adapters, got {peft_type}")
        task_type = getattr(config.task_type, "value", config.task_type)
        if task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"{source}: task_type must be CAUSAL_LM, got {task_type}")
        expected = {"num_layers": self.num_layers, "num_attention_heads": self.num_kv_heads,
                    "token_dim": self.token_dim, "num_transformer_submodules": 1}
        for key, value in expected.items():
            if getattr(config, key) != value:
                raise ValueError(f"{source}: {key}={getattr(config, key)} does not match the model ({key}={value}; "
                                 f"PEFT sizes a prefix per KV head)")
        if not int(config.num_virtual_tokens) > 0:
            raise ValueError(f"{source}: num_virtual_tokens must be positive, got {config.num_virtual_tokens}")

    def _create(self, config):
        from peft.tuners.prefix_tuning.model import PrefixEncoder
        from peft.utils import _prepare_prompt_learning_config

        config = copy.deepcopy(config)
        if config.task_type is None:
            config.task_type = "CAUSAL_LM"
        config.inference_mode = False
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 1  # what PeftModel sets for a decoder-only model
        config = _prepare_prompt_learning_config(config, self.model.config)
        # get_peft_model records (and saves) the model's own name; a model built from a config has "" (PEFT then
        # records None; here a name the caller put in the config is kept).
        config.base_model_name_or_path = (self.model.__dict__.get("name_or_path", None)
                                          or config.base_model_name_or_path)
        self._check_config(config, "config")
        return config, PrefixEncoder(config)

    def _load_directory(self, path, allow_pickle):
        from peft import PeftConfig
        from peft.tuners.prefix_tuning.model import PrefixEncoder

        from .adapters import check_compatible, load_prompt_adapter

        saved = load_prompt_adapter(path, allow_pickle=allow_pickle)
        if saved.peft_type != PREFIX_TUNING:
            raise ValueError(f"{path}: MultiPrefixTrainer trains prefix tuning adapters, got {saved.peft_type}")
        check_compatible(saved, BaseGeometry.of(self.model.config))
        config = PeftConfig.from_peft_type(**saved.config)
        self._check_config(config, path)
        # The saved tensor is the prefix itself (a projection adapter is saved as the MLP's output): PEFT loads it
        # into a plain table, built in inference mode.
        config.inference_mode = True
        encoder = PrefixEncoder(config)
        with torch.no_grad():  # check_compatible checked the shape [P, num_layers * 2 * token_dim]
            encoder.embedding.weight.copy_(saved.embeddings)
        return config, encoder

    def _copy_peft_model(self, peft_model, adapter_name):
        adapter_name = adapter_name or peft_model.active_adapter
        if adapter_name not in peft_model.peft_config:
            raise ValueError(f"the PeftModel has no adapter {adapter_name!r} "
                             f"(it has {sorted(peft_model.peft_config)})")
        config = copy.deepcopy(peft_model.peft_config[adapter_name])
        self._check_config(config, f"PeftModel adapter {adapter_name!r}")
        encoder = copy.deepcopy(peft_model.prompt_encoder[adapter_name]).float()
        return config, encoder

    def remove_adapter(self, name):
        """Drop adapter ``name`` with its optimizer."""
        self._tenant(name)
        del self._tenants[name]
        self._tables.encoders = torch.nn.ModuleList(tenant.encoder for tenant in self._tenants.values())
        self._slots = {n: i for i, n in enumerate(self._tenants)}
        self._ddp = None

    def _tenant(self, name):
        if name not in self._tenants:
            raise KeyError(f"unknown adapter {name!r} (adapters: {self.adapters})")
        return self._tenants[name]

    # ------------------------------------------------------------------ forward and loss

    def _compute_dtype(self):
        """dtype of the backbone's attention inputs, which the prefix tables must share."""
        if self.autocast_dtype is not None:
            return self.autocast_dtype
        return self.model.get_input_embeddings().weight.dtype

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _table_module(self):
        """The prefix-table module, through DDP when gradients flow in a multi-process run."""
        _, world = _distributed()
        if world == 1 or not torch.is_grad_enabled():
            return self._tables
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Adapters absent from a step are unused parameters of that step.
            self._ddp = DistributedDataParallel(self._tables, device_ids=device_ids, find_unused_parameters=True)
        return self._ddp

    def forward(self, input_ids, adapters: Sequence[str], attention_mask=None, labels=None) -> MultiPrefixOutput:
        """Run the backbone on a mixed batch, row b with the prefix of adapter ``adapters[b]``.

        Arguments:
            input_ids: ``[B, L]`` integer token ids (any padding side; positions are ``arange(L) + P`` per row, as
                PEFT's forward places them).
            adapters: B adapter names.
            attention_mask: ``[B, L]`` 0/1 or bool, 1 = real token; default all real.
            labels: ``[B, L]`` integer or None; ``-100`` = no loss. Shifted inside (token i predicts label i+1).

        Returns ``MultiPrefixOutput``. Raises KeyError for unknown adapter names, ValueError for bad shapes.
        """
        input_ids, attention_mask, labels, rows = self._check_batch(input_ids, adapters, attention_mask, labels)
        B, L = input_ids.shape
        counts = self._token_counts(rows, labels) if labels is not None else None

        # Table entries: adapters with rows here, plus (under DDP) those with labelled tokens on other processes,
        # so every process uses the same parameters and DDP reduces the same gradients everywhere.
        present = list(dict.fromkeys(rows))
        if counts is not None:
            present += [n for n in self._tenants if counts[n] > 0 and n not in present]
        entry = {name: i for i, name in enumerate(present)}
        lengths = [self._tenants[n].num_virtual_tokens for n in present]
        device = self.device
        prefix_index = torch.tensor([entry[n] for n in rows], dtype=torch.int32, device=device)
        prefix_lengths = torch.tensor(lengths, dtype=torch.int32, device=device)
        # PEFT's forward: the real tokens follow the P virtual tokens, positions arange(L) + P, not pad-aware.
        position_ids = (torch.arange(L, device=device)[None, :]
                        + prefix_lengths.to(torch.long)[prefix_index.to(torch.long)][:, None])

        from .integration.attention import PREFIX_KWARG, PrefixSpec

        with self._autocast():
            keys, values = self._table_module()(tuple(self._slots[n] for n in present), tuple(lengths),
                                                self._compute_dtype())
            # Indices and lengths are valid by construction (entries of ``present``, their own lengths): skip the
            # spec's device-syncing value checks.
            spec = PrefixSpec.build(keys, values, prefix_index, prefix_lengths, check_values=False)
            # The attention mask is always passed: without one transformers would read position_ids offset by P as
            # packed sequences.
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, **{PREFIX_KWARG: spec})
            spec.check_consumed(type(self.model).__name__, "the adapters' prefixes")
        logits = out.logits
        if labels is None:
            return MultiPrefixOutput(logits=logits)
        return self._loss(logits, labels, rows, counts)

    __call__ = forward

    def _check_batch(self, input_ids, adapters, attention_mask, labels):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor [B, L], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        B, L = input_ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"input_ids must hold at least one row and one token, got shape {tuple(input_ids.shape)}")
        if isinstance(adapters, str) or len(adapters) != B:
            raise ValueError(f"adapters must be a sequence of {B} adapter names (one per row), got {adapters!r}")
        unknown = sorted({str(n) for n in adapters if n not in self._tenants})
        if unknown:
            raise KeyError(f"unknown adapters {unknown} (adapters: {self.adapters})")
        for tensor, what in ((attention_mask, "attention_mask"), (labels, "labels")):
            if tensor is not None and tuple(tensor.shape) != (B, L):
                raise ValueError(f"{what} must have the shape of input_ids {(B, L)}, got {tuple(tensor.shape)}")
        if labels is not None and labels.dtype.is_floating_point:
            raise ValueError(f"labels must be integer, got {labels.dtype}")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        return input_ids, attention_mask, labels, list(adapters)

    def _token_counts(self, rows, labels):
        """name -> labelled tokens (after the shift), summed over processes."""
        per_row = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
        counts = torch.zeros(len(self._tenants), dtype=torch.float64, device=labels.device)
        slots = torch.tensor([self._slots[n] for n in rows], device=labels.device)
        counts.index_add_(0, slots, per_row.to(torch.float64))
        if _distributed()[1] > 1:
            torch.distributed.all_reduce(counts)
        counts = counts.tolist()
        return {name: int(counts[slot]) for name, slot in self._slots.items()}

    def _loss(self, logits, labels, rows, counts):
        B, L, vocab = logits.shape
        # Causal-LM loss as transformers computes it: fp32 logits, labels shifted left, -100 ignored.
        token_losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="none").view(B, L - 1)
        row_sums = token_losses.sum(dim=1)
        _, world = _distributed()
        # Row weight 1/n_t (n_t: adapter t's labelled tokens over all processes) makes the sum over rows the sum of
        # per-adapter means; the world factor undoes DDP's averaging of gradients over processes.
        weights = torch.tensor([world / counts[n] if counts[n] else 0.0 for n in rows], dtype=row_sums.dtype,
                               device=row_sums.device)
        loss = (row_sums * weights).sum()

        # Per-adapter means for reporting, over all processes.
        sums = torch.zeros(len(self._tenants), dtype=torch.float64, device=row_sums.device)
        slots = torch.tensor([self._slots[n] for n in rows], device=row_sums.device)
        sums.index_add_(0, slots, row_sums.detach().to(torch.float64))
        if world > 1:
            torch.distributed.all_reduce(sums)
        sums = sums.tolist()
        adapter_losses = {name: sums[slot] / counts[name] for name, slot in self._slots.items() if counts[name]}
        return MultiPrefixOutput(logits=logits, loss=loss, adapter_losses=adapter_losses, token_counts=counts)

    # ------------------------------------------------------------------ training

    def zero_grad(self):
        """Drop every adapter's gradients."""
        for tenant in self._tenants.values():
            tenant.optimizer.zero_grad(set_to_none=True)

    def training_step(self, input_ids, adapters: Sequence[str], attention_mask=None, labels=None) -> dict:
        """One optimisation step on a mixed batch (arguments as in ``forward``; labels default to input_ids with
        ``-100`` at padding). The backbone is put in train mode (as transformers' Trainer does; activation
        checkpointing only acts in train mode).

        Every adapter with labelled tokens in the batch (over all processes) takes one step of its own optimizer
        (and scheduler); the others are left exactly as they were.

        Returns ``{"loss": float (the combined loss, summed over processes), "adapter_losses": {name: mean token
        loss over all processes}, "updated": [names stepped]}``.
        """
        if labels is None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        self.model.train()
        self.zero_grad()
        out = self.forward(input_ids, adapters, attention_mask=attention_mask, labels=labels)
        loss = self._scaler.scale(out.loss) if self._scaler is not None else out.loss
        loss.backward()

        updated = [name for name in self._tenants if out.token_counts[name] > 0]
        for name in updated:
            tenant = self._tenants[name]
            if self.max_grad_norm is not None:
                if self._scaler is not None:
                    self._scaler.unscale_(tenant.optimizer)
                torch.nn.utils.clip_grad_norm_(tenant.encoder.parameters(), self.max_grad_norm)
            if self._scaler is not None:
                self._scaler.step(tenant.optimizer)
            else:
                tenant.optimizer.step()
            if tenant.scheduler is not None:
                tenant.scheduler.step()
            tenant.updates += 1
        if self._scaler is not None:
            self._scaler.update()
        self.zero_grad()
        return {"loss": sum(out.adapter_losses.values()), "adapter_losses": dict(out.adapter_losses),
                "updated": updated}

    def train(self, records: Sequence, *, batch_size: int = 8, epochs: int = 1, max_steps: Optional[int] = None,
              shuffle: bool = True, seed: int = 0, adapter_field: str = "task", max_length: Optional[int] = None,
              pad_token_id: Optional[int] = None, callback: Optional[Callable[[dict], None]] = None) -> List[dict]:
        """Train on tokenized records of several adapters, mixed in every batch.

        records: a sequence (list, ``datasets.Dataset``, ...) of mappings or objects with ``input_ids`` (list of
            ints or 1-D tensor), optional ``labels`` (same length, ``-100`` = no loss; default ``input_ids``: loss on
            every token) and the adapter name under ``adapter_field`` (default ``"task"``).
        batch_size: rows per process and step (under DDP the global batch is ``batch_size * world_size`` rows;
            rank r takes rows r, r + world_size, ... of it).
        epochs, max_steps: passes over the data; stop early after ``max_steps`` steps.
        shuffle, seed: the order of records in each epoch is a seeded permutation (the same on every process).
        max_length: cut longer records to their first ``max_length`` tokens.
        pad_token_id: default the model config's ``pad_token_id``, else 0. Batches are right-padded (PEFT places real
            tokens at ``P .. P+L-1`` regardless of padding, so right padding keeps every row as it is alone).
        callback: called after every step with ``training_step``'s result plus ``"step"`` and ``"epoch"``.

        Returns the list of step results. Raises KeyError naming records' adapters that were never added (before
        any step), ValueError for records without ``input_ids`` or with labels of another length.
        """
        if batch_size < 1 or epochs < 0 or (max_steps is not None and max_steps < 0):
            raise ValueError(f"batch_size must be >= 1 and epochs, max_steps >= 0; got {batch_size}, {epochs}, "
                             f"{max_steps}")
        names = [_field(record, adapter_field) for record in records]
        unknown = sorted({str(n) for n in names if n not in self._tenants})
        if unknown:
            raise KeyError(f"records name adapters that were not added (field {adapter_field!r}): {unknown}; "
                           f"adapters: {self.adapters}")
        if pad_token_id is None:
            pad_token_id = getattr(self.model.config, "pad_token_id", None)
            pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        rank, world = _distributed()
        global_batch = batch_size * world
        history = []
        for epoch in range(epochs):
            order = (torch.randperm(len(names), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
                     if shuffle else list(range(len(names))))
            for start in range(0, len(order), global_batch):
                if max_steps is not None and len(history) >= max_steps:
                    return history
                chunk = order[start:start + global_batch]
                if len(chunk) < world:
                    break  # too few rows left to give every process one
                mine = chunk[rank::world]
                input_ids, attention_mask, labels = self._collate([records[i] for i in mine], max_length,
                                                                  pad_token_id)
                result = self.training_step(input_ids, [names[i] for i in mine], attention_mask=attention_mask,
                                            labels=labels)
                result.update(step=len(history) + 1, epoch=epoch)
                history.append(result)
                if callback is not None:
                    callback(result)
        return history

    @staticmethod
    def _collate(records, max_length, pad_token_id):
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding) ``[B, Lmax]``."""
        rows = []
        for record in records:
            ids = _field(record, "input_ids")
            if ids is None:
                raise ValueError("every record needs input_ids")
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
            labels = _field(record, "labels")
            labels = ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            if labels.shape != ids.shape:
                raise ValueError(f"a record's labels ({labels.numel()}) and input_ids ({ids.numel()}) differ in "
                                 "length")
            if max_length is not None:
                ids, labels = ids[:max_length], labels[:max_length]
            if ids.numel() == 0:
                raise ValueError("a record has no tokens")
            rows.append((ids, labels))
        return right_pad(rows, pad_token_id)

    # ------------------------------------------------------------------ saving

    def save_adapter(self, name: str, directory):
        """Write adapter ``name`` as PEFT writes a prefix-tuning adapter: ``adapter_config.json`` (its config with
        ``inference_mode`` true) and ``adapter_model.safetensors`` holding one fp32 tensor ``prompt_embeddings``
        ``[P, num_layers * 2 * Hkv * head_dim]`` (with projection: the MLP's output). Loads with
        ``PeftModel.from_pretrained``. Under ``torch.distributed`` only rank 0 writes."""
        from safetensors.torch import save_file

        tenant = self._tenant(name)
        if _distributed()[0] != 0:
            return
        directory = os.fspath(directory)
        if os.path.isfile(directory):
            raise ValueError(f"{directory} is a file; save_adapter writes a directory")
        os.makedirs(directory, exist_ok=True)
        with torch.no_grad():
            embeddings = _encoder_output(tenant.encoder, tenant.num_virtual_tokens)
        embeddings = embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous()
        save_file({EMBEDDINGS_KEY: embeddings}, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
        config = copy.deepcopy(tenant.config)
        config.inference_mode = True
        config.save_pretrained(directory)

    def save_pretrained(self, directory, adapters: Optional[Sequence[str]] = None):
        """Save every adapter (or those named) to ``directory/<name>/`` with ``save_adapter``."""
        names = self.adapters if adapters is None else list(adapters)
        for name in names:
            self._tenant(name)
        for name in names:
            self.save_adapter(name, os.path.join(os.fspath(directory), name))

    def restore_model(self):
        """Switch the backbone back to the attention implementation it had before (its parameters stay frozen)."""
        from .integration import compat

        compat.set_attn_implementation(self.model, self._previous_attn_implementation)
