"""Training many prefix-tuning adapters together on one frozen backbone: mixed-tenant batches.

PEFT keeps one active prompt-learning adapter per model, so tuning one prefix per task or customer costs one run
each. Here N prefix-tuning adapters (with or without ``prefix_projection``, each with its own number of virtual
tokens) share one frozen causal LM and train from batches whose rows belong to different adapters. Each step builds,
differentiably, one prefix table per layer from the adapters present in the batch; the fused prefix attention reads
row b's prefix through ``prefix_index`` and its backward hands every table entry the gradient summed over the rows
that used it, so each adapter receives exactly the gradient of its own rows.

Encoder-decoders (T5, MT5, BART): ``MultiPrefixModel(model)`` (and so ``MultiPrefixTrainer``) builds
``fastpeft.multi_seq2seq.EncoderDecoderMultiPrefixModel``, which trains prefix-tuning, prompt-tuning and p-tuning
adapters mixed in one batch, each row as PEFT's ``PeftModelForSeq2SeqLM`` runs it.

Two ways to drive it:

- ``MultiPrefixModel``: a ``torch.nn.Module`` whose only trainable parameters are the adapters' PEFT
  ``PrefixEncoder``s; rows name their adapter by index (``adapter_ids``). ``transformers.Trainer`` (with
  ``fastpeft.data.AdapterBatchCollator`` as its collator), ``accelerate`` or any torch loop trains it::

      model = fastpeft.MultiPrefixModel(base_model)
      model.add_adapter("support", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
      model.add_adapter("legal", "path/to/peft_prefix_adapter")            # continue a saved PEFT adapter
      trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                     data_collator=AdapterBatchCollator(model.adapters, pad_token_id=0),
                                     callbacks=[SaveAdaptersCallback()])   # checkpoint-N/<adapter>/ PEFT dirs
      trainer.train()
      model.save_pretrained("out/")                                        # out/support, out/legal

- ``MultiPrefixTrainer``: the same model plus one optimizer per adapter (each adapter's own AdamW, scheduler and
  clipping; an adapter without labelled tokens in a step is not stepped at all) and a data loop over records::

      trainer = fastpeft.MultiPrefixTrainer(base_model, lr=1e-2)
      trainer.add_adapter("support", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
      records = [{"task": "support", "input_ids": [...], "labels": [...]}, {"task": "legal", ...}, ...]
      trainer.train(records, batch_size=16, epochs=3)
      trainer.save_pretrained("out/")

    # each directory loads in plain PEFT: PeftModel.from_pretrained(base_model, "out/legal")

Semantics per row are PEFT's prefix tuning (``PEFT_NOTES.md``): the prefix is stored per KV head and never rotated;
the real tokens of a row of adapter t sit at positions ``P_t .. P_t+L-1`` (``prefix_tables.offset_positions``, not
pad-aware, as in PEFT's ``forward``); the loss is the causal-LM loss (labels shifted by one inside, ``-100``
ignored).

Loss. PEFT averages the token losses over the whole batch. Here each adapter's loss is the mean over the labelled
tokens of its own rows, and the loss that is back-propagated is their sum::

    loss = sum over adapters t present in the batch of  (sum of token losses of t's rows) / (labelled tokens of t)

so the gradient each adapter receives is exactly the gradient PEFT computes for that adapter on a batch made of its
own rows, whatever the other rows are. Under ``torch.distributed`` (DistributedDataParallel, FSDP) the token counts
are summed over processes first and the loss is scaled for the gradient averaging over processes, so the gradients
equal those of one process holding the whole global batch.

Optimisation (``MultiPrefixTrainer``). Every adapter has its own optimizer (AdamW by default), and optional
scheduler and gradient clipping. An adapter whose rows carry no labelled token in a step (over all processes) is not
stepped at all: its parameters, its optimizer state (Adam's moments and step count) and its learning-rate schedule
are untouched, and decoupled weight decay is not applied to it. A tenant's training therefore equals training it
alone on the sub-sequence of batches that contain it. Under one optimizer over all adapters (Trainer, accelerate),
an adapter absent from a step gets no gradient (None), which torch's optimizers skip.
"""

import copy
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.utils import ModelOutput

from .adapters import EMBEDDINGS_KEY, PREFIX_TUNING, SAFETENSORS_FILE, check_compatible, load_prompt_adapter, \
    split_prefix
from .backbone import FrozenBackbone
from .data import IGNORE_INDEX, AdapterBatchCollator
from .integration import sharding
from .integration.attention import PrefixSpec, autocast_dtype
from .prefix_tables import Routing, offset_positions
from .training_loop import Updater, optimizer_step, run_steps

__all__ = ["MultiPrefixModel", "MultiPrefixModelOutput", "MultiPrefixTrainer", "MultiPrefixOutput",
           "SaveAdaptersCallback", "IGNORE_INDEX", "MIXED_PRECISION", "prompt_encoder_output"]

MIXED_PRECISION = {None: None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKBONE_ATTR = "base_model"  # the backbone's name inside MultiPrefixModel (and its state-dict prefix)


def _distributed():
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def prompt_encoder_output(encoder, config):
    """What PEFT's prompt encoder ``encoder`` (of adapter configuration ``config``) outputs and saves
    (``get_prompt_embedding_to_save``), differentiably, fp32: a ``PrefixEncoder``'s prefix ``[P, num_layers * 2 * Hkv *
    head_dim]``; a ``PromptEmbedding``'s (prompt tuning) or ``PromptEncoder``'s (p-tuning) virtual-token embeddings
    ``[P * num_transformer_submodules, hidden]``.

    With a projection MLP (a prefix created for training with ``prefix_projection``) or a p-tuning MLP/LSTM head it is
    the head applied to the virtual-token embeddings, computed once per step rather than once per row as PEFT's prefix
    tuning does (the same values; the gradient of the shared output is the sum over rows). Otherwise (no head, or an
    adapter loaded in inference mode, whose table holds the saved output) the embedding table itself, which is what
    PEFT's ``embedding(arange(n))`` returns."""
    device = encoder.embedding.weight.device
    if getattr(encoder, "transform", None) is not None:
        tokens = torch.arange(int(config.num_virtual_tokens), device=device)
        return encoder.transform(encoder.embedding(tokens))
    if getattr(encoder, "mlp_head", None) is not None:
        # One row of all the virtual tokens, as PEFT runs it: an LSTM head mixes them along the sequence.
        tokens = torch.arange(encoder.embedding.num_embeddings, device=device)
        return encoder(tokens[None])[0]
    return encoder.embedding.weight


def _gathered_encoder_output(encoder, config):
    """``prompt_encoder_output`` without gradients, on the encoder's gathered parameters
    (``sharding.full_parameters``), so that an encoder sharded by FSDP2 (a Trainer or accelerate wrapping a
    ``MultiPrefixModel``) is read whole outside its forward. Every process must call it."""
    from torch.func import functional_call

    reader = _EncoderOutputReader(encoder, config)
    parameters = {f"encoder.{name}": tensor for name, tensor in sharding.full_parameters(encoder).items()}
    with torch.no_grad():
        return functional_call(reader, parameters, ()).detach()


class _EncoderOutputReader(torch.nn.Module):
    """``prompt_encoder_output`` as a module's forward, for ``functional_call`` over substituted parameters."""

    def __init__(self, encoder, config):
        super().__init__()
        self.encoder, self.config = encoder, config

    def forward(self):
        return prompt_encoder_output(self.encoder, self.config)


@dataclass
class MultiPrefixModelOutput(ModelOutput):
    """Result of ``MultiPrefixModel.forward`` (a transformers ``ModelOutput``: ``out.loss``, ``out["loss"]``).

    loss: scalar to back-propagate (None without labels): the sum over adapters of each adapter's mean token loss
        (see the module docstring). Under ``torch.distributed`` it is this process's share, scaled so that the
        gradient averaging of DDP/FSDP yields the gradient of the global loss.
    logits: ``[B, L, vocab]`` of the input's positions (no virtual-token positions), as PEFT's prefix tuning returns.
    adapter_losses: ``[N]`` float64, indexed like ``model.adapters``: each adapter's mean token loss over all
        processes, NaN for an adapter without labelled tokens. Their sum (without the NaNs) is the combined loss.
    token_counts: ``[N]`` float64: each adapter's labelled tokens (after the shift), summed over all processes.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    adapter_losses: Optional[torch.Tensor] = None
    token_counts: Optional[torch.Tensor] = None


class MultiPrefixModel(torch.nn.Module):
    """N PEFT prefix-tuning adapters on one frozen causal LM, as a module any training loop can drive (see the module
    docstring).

    Arguments:
        model: a transformers causal LM (``PreTrainedModel``; full precision or loaded in 4/8 bit through
            bitsandbytes), not a ``PeftModel``. It becomes this module's ``base_model``: its parameters are frozen
            (``requires_grad_(False)``) and it is switched to the ``"fastpeft"`` attention implementation;
            ``restore()`` switches it back. An encoder-decoder LM (T5, MT5, BART) makes this class build
            ``fastpeft.multi_seq2seq.EncoderDecoderMultiPrefixModel`` (prefix, prompt and p-tuning adapters).
        gradient_checkpointing: enable activation checkpointing on the backbone (non-reentrant, which keeps the
            prefix tables, passed as keyword arguments, in the recomputed graph). PEFT refuses this for prefix
            tuning; here it gives the same gradients. It acts in train mode only, as transformers'.
        user: the name refusals and warnings give the caller (``MultiPrefixTrainer`` passes its own).

    The trainable parameters are the encoders in ``prefix_encoders`` (index = adapter id), nothing else.
    ``state_dict()`` holds only them (``prefix_encoders.<id>....``; the frozen backbone belongs to the caller), so a
    Trainer or accelerate checkpoint is the adapters' size and resumes with ``load_state_dict``;
    ``save_pretrained`` writes each adapter as a plain PEFT directory. Mixed precision is the caller's
    ``torch.autocast`` (Trainer's ``bf16=True``, accelerate's ``mixed_precision``): the tables are built in the
    autocast dtype; the encoders stay float32.
    """

    # transformers.Trainer must not pass num_items_in_batch: the loss normalises per adapter itself.
    accepts_loss_kwargs = False
    # Whether the backbone is an encoder-decoder (fastpeft.multi_seq2seq's subclass), and how far a label sits after
    # the position whose logits predict it: one for a causal LM (token i predicts label i+1), none for a decoder fed
    # the labels shifted right.
    encoder_decoder = False
    _LABEL_SHIFT = 1

    def __new__(cls, model=None, *args, **kwargs):
        # One public class: an encoder-decoder backbone (T5, MT5, BART) gets the model whose prompts go through the
        # encoder with each row and whose prefixes reach the decoder's self-attention (fastpeft.multi_seq2seq).
        # (``model`` defaults to None for copy and pickle, which call ``__new__`` with no arguments.)
        if cls is MultiPrefixModel and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            from .multi_seq2seq import EncoderDecoderMultiPrefixModel

            cls = EncoderDecoderMultiPrefixModel
        return super().__new__(cls)

    def __init__(self, model, *, gradient_checkpointing: bool = False, user: str = "MultiPrefixModel"):
        super().__init__()
        self._backbone = FrozenBackbone(
            model, user, eval_mode=False, freeze=True, gradient_checkpointing=gradient_checkpointing,
            encoder_decoder=self.encoder_decoder,
            peft_hint="pass peft_model.get_base_model() and add the PeftModel's adapter with add_adapter(name, "
                      "peft_model)")
        self.geometry = self._backbone.geometry
        self.base_model = model
        self.prefix_encoders = torch.nn.ModuleList()
        # Set by MultiPrefixTrainer when it averages the encoders' gradients itself beside a sharded backbone.
        self._caller_averages_gradients = False
        self._names: List[str] = []
        self._configs: list = []
        self.register_state_dict_post_hook(_drop_backbone_entries)
        self.register_load_state_dict_post_hook(_ignore_missing_backbone_entries)

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> List[str]:
        """Adapter names, in the order they were added: ``adapter_ids`` index this list."""
        return list(self._names)

    def adapter_id(self, name) -> int:
        """The index of adapter ``name`` (what a row's ``adapter_ids`` entry holds). KeyError if unknown."""
        if name not in self._names:
            raise KeyError(f"unknown adapter {name!r} (adapters: {self._names})")
        return self._names.index(name)

    def encoder(self, name):
        """The PEFT ``PrefixEncoder`` of adapter ``name`` (its parameters are the trainable ones)."""
        return self.prefix_encoders[self.adapter_id(name)]

    def adapter_config(self, name):
        """The PEFT ``PrefixTuningConfig`` of adapter ``name`` (what ``save_adapter`` writes, with
        ``inference_mode`` set there). Not ``config``: transformers' Trainer reads a model's ``config`` as a model
        configuration."""
        return self._configs[self.adapter_id(name)]

    def add_adapter(self, name: str, adapter, *, peft_adapter_name: Optional[str] = None,
                    allow_pickle: bool = False) -> int:
        """Add a prefix-tuning adapter called ``name`` (unique, non-empty); returns its index.

        adapter is one of:
        - a ``peft.PrefixTuningConfig``: a new adapter initialised as PEFT's ``get_peft_model`` initialises it
          (PEFT's ``PrefixEncoder``; with ``prefix_projection`` the embedding + MLP are trained);
        - a path to a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``): training
          continues from the saved prefix. PEFT saves a projection adapter as the MLP's output, so such an adapter
          continues as a plain prefix table (as ``PeftModel.from_pretrained`` loads it). A pickle-only checkpoint
          (``adapter_model.bin``) is refused unless ``allow_pickle=True``;
        - a ``PeftModel`` with a prefix-tuning adapter (``peft_adapter_name``, default its active one): its prompt
          encoder is copied, projection MLP included when it has one.

        The encoder goes to the backbone's input-embedding device, in float32. Raises ValueError for a duplicate
        name, an adapter that is not prefix tuning or whose layers, KV heads or head size do not match the model,
        and a directory without (safetensors) weights.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._names:
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
        encoder = encoder.to(self.base_model.get_input_embeddings().weight.device)
        encoder.requires_grad_(True)
        self.prefix_encoders.append(encoder)
        self._names.append(name)
        self._configs.append(config)
        return len(self._names) - 1

    def remove_adapter(self, name):
        """Drop adapter ``name``; the adapters after it move one index down."""
        index = self.adapter_id(name)
        del self.prefix_encoders[index]
        del self._names[index]
        del self._configs[index]

    def _check_config(self, config, source):
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        if peft_type != PREFIX_TUNING:
            raise ValueError(f"{source}: MultiPrefixTrainer trains prefix tuning adapters, got {peft_type}")
        task_type = getattr(config.task_type, "value", config.task_type)
        if task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"{source}: task_type must be CAUSAL_LM, got {task_type}")
        g = self.geometry
        expected = {"num_layers": g.num_layers, "num_attention_heads": g.num_kv_heads,
                    "token_dim": g.num_kv_heads * g.head_dim, "num_transformer_submodules": 1}
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
        config = _prepare_prompt_learning_config(config, self.base_model.config)
        # get_peft_model records (and saves) the model's own name; a model built from a config has "" (PEFT then
        # records None; here a name the caller put in the config is kept).
        config.base_model_name_or_path = (self.base_model.__dict__.get("name_or_path", None)
                                          or config.base_model_name_or_path)
        self._check_config(config, "config")
        return config, PrefixEncoder(config)

    def _load_directory(self, path, allow_pickle):
        from peft import PeftConfig
        from peft.tuners.prefix_tuning.model import PrefixEncoder

        saved = load_prompt_adapter(path, allow_pickle=allow_pickle)
        if saved.peft_type != PREFIX_TUNING:
            raise ValueError(f"{path}: MultiPrefixTrainer trains prefix tuning adapters, got {saved.peft_type}")
        check_compatible(saved, self.geometry)
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
        encoder = copy.deepcopy(peft_model.prompt_encoder[adapter_name]).float()
        self._check_encoder(config, encoder, f"PeftModel adapter {adapter_name!r}")
        return config, encoder

    def _check_encoder(self, config, encoder, source):
        """Refuse an adapter (its config and prompt encoder) this model cannot train, naming ``source``."""
        self._check_config(config, source)

    # ------------------------------------------------------------------ forward and loss

    def forward(self, input_ids, attention_mask=None, labels=None, adapter_ids=None) -> MultiPrefixModelOutput:
        """Run the backbone on a mixed batch, row b with the prefix of adapter ``adapter_ids[b]``.

        Arguments:
            input_ids: ``[B, L]`` integer token ids (any padding side; positions are ``arange(L) + P`` per row, as
                PEFT's forward places them).
            attention_mask: ``[B, L]`` 0/1 or bool, 1 = real token; default all real.
            labels: ``[B, L]`` integer or None; ``-100`` = no loss. Shifted inside (token i predicts label i+1).
            adapter_ids: ``[B]`` integers (a tensor or a sequence), indices into ``adapters``.

        Returns ``MultiPrefixModelOutput``. Raises IndexError for an adapter index out of range, ValueError for bad
        shapes or types.
        """
        self._backbone.check_attention()
        if self.training and torch.is_grad_enabled() and not self._caller_averages_gradients:
            # Under FSDP2, encoders outside every fully_shard unit would train on this process's rows alone.
            sharding.check_sharded(self, self.prefix_encoders.named_parameters(prefix="prefix_encoders"))
        input_ids, attention_mask, labels, adapter_ids = self._check_batch(input_ids, attention_mask, labels,
                                                                           adapter_ids)
        B, L = input_ids.shape
        N = len(self._names)
        rows_per_adapter, counts, world = self._statistics(adapter_ids, labels)

        # Table entries: the adapters with rows, in adapter order; each row reads its adapter's entry.
        entries = rows_per_adapter.nonzero().flatten().tolist()
        entry_of = torch.zeros(N, dtype=torch.int32, device=input_ids.device)
        entry_of[entries] = torch.arange(len(entries), dtype=torch.int32, device=input_ids.device)
        lengths = [int(self._configs[i].num_virtual_tokens) for i in entries]
        prefix_lengths = torch.tensor(lengths, dtype=torch.int32, device=input_ids.device)
        prefix_index = entry_of[adapter_ids]
        routing = Routing(prefix_index, prefix_lengths.to(torch.long)[prefix_index.to(torch.long)])

        embedding = self.base_model.get_input_embeddings().weight
        keys, values = self._tables(entries, lengths, autocast_dtype(input_ids.device.type, embedding.dtype))
        # Indices and lengths are valid by construction (entries of ``entries``, their own lengths): skip the spec's
        # device-syncing value checks.
        spec = PrefixSpec.build(keys, values, routing.prefix_index, prefix_lengths, check_values=False)
        # The attention mask is always passed: without one transformers would read position_ids offset by P as
        # packed sequences.
        logits = self._backbone.forward(spec, "the adapters' prefixes", input_ids=input_ids,
                                        attention_mask=attention_mask,
                                        position_ids=offset_positions(L, routing.position_offsets))
        if labels is None:
            return MultiPrefixModelOutput(logits=logits)
        return self._loss(logits, labels, adapter_ids, counts, world)

    def _statistics(self, adapter_ids, labels):
        """``(rows_per_adapter [N], token_counts [N] or None without labels, world size)``, float64, summed over all
        processes: each adapter's rows and labelled tokens (a label counts where some position's logits predict it,
        ``_LABEL_SHIFT``)."""
        N = len(self._names)
        _, world = _distributed()
        rows_per_adapter = torch.bincount(adapter_ids, minlength=N).to(torch.float64)
        counts = None
        if labels is not None:
            tokens_per_row = (labels[:, self._LABEL_SHIFT:] != IGNORE_INDEX).sum(dim=1).to(torch.float64)
            counts = torch.zeros(N, dtype=torch.float64, device=adapter_ids.device).index_add_(0, adapter_ids,
                                                                                               tokens_per_row)
            if world > 1:
                # Every process builds its tables from the adapters with rows on any process: all then run the same
                # parameters (DDP and FSDP reduce the same gradients everywhere) and each gets its token counts.
                statistics = torch.stack([rows_per_adapter, counts])
                torch.distributed.all_reduce(statistics)
                rows_per_adapter, counts = statistics.unbind(0)
        return rows_per_adapter, counts, world

    def _tables(self, entries, lengths, dtype):
        """Per-layer prefix tables of the adapters ``entries`` (their ``lengths`` virtual tokens): one
        ``[T, Hkv, Pmax, D]`` tensor per layer, in ``dtype``, entry t zero-padded after ``lengths[t]``. PEFT's
        layout: the encoder output viewed as ``[P, 2 * num_layers, Hkv, D]``, slot 2i is layer i's keys and 2i+1
        its values."""
        p_max = max(lengths)
        flats = [F.pad(prompt_encoder_output(self.prefix_encoders[i], self._configs[i]).to(dtype),
                       (0, 0, 0, p_max - length))
                 for i, length in zip(entries, lengths)]
        g = self.geometry
        return split_prefix(torch.stack(flats), g.num_layers, g.num_kv_heads, g.head_dim)

    def _check_batch(self, input_ids, attention_mask, labels, adapter_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor [B, L], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        B, L = input_ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"input_ids must hold at least one row and one token, got shape {tuple(input_ids.shape)}")
        device = input_ids.device
        if adapter_ids is None or isinstance(adapter_ids, str):
            raise ValueError(f"adapter_ids must give one adapter index per row ({B}), got {adapter_ids!r}")
        adapter_ids = torch.as_tensor(adapter_ids, device=device)
        if adapter_ids.shape != (B,) or adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
            raise ValueError(f"adapter_ids must be {B} integer adapter indices (one per row), got "
                             f"{adapter_ids.dtype} of shape {tuple(adapter_ids.shape)}")
        adapter_ids = adapter_ids.to(torch.long)
        if int(adapter_ids.min()) < 0 or int(adapter_ids.max()) >= len(self._names):
            raise IndexError(f"adapter_ids must index the {len(self._names)} adapters {self._names}, got "
                             f"{adapter_ids.tolist()}")
        for tensor, what in ((attention_mask, "attention_mask"), (labels, "labels")):
            if tensor is not None and tuple(tensor.shape) != (B, L):
                raise ValueError(f"{what} must have the shape of input_ids {(B, L)}, got {tuple(tensor.shape)}")
        if labels is not None and labels.dtype.is_floating_point:
            raise ValueError(f"labels must be integer, got {labels.dtype}")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        return input_ids, attention_mask, None if labels is None else labels.to(device), adapter_ids

    def _loss(self, logits, labels, adapter_ids, counts, world):
        B, L, vocab = logits.shape
        shift = self._LABEL_SHIFT
        # The LM loss as transformers computes it: fp32 logits, labels shifted left by _LABEL_SHIFT, -100 ignored.
        token_losses = F.cross_entropy(logits[:, :L - shift].float().reshape(-1, vocab),
                                       labels[:, shift:].reshape(-1), ignore_index=IGNORE_INDEX,
                                       reduction="none").view(B, L - shift)
        row_sums = token_losses.sum(dim=1)
        # Row weight 1/n_t (n_t: adapter t's labelled tokens over all processes) makes the sum over rows the sum of
        # per-adapter means; the world factor undoes the gradient averaging over processes.
        row_counts = counts[adapter_ids]
        weights = torch.where(row_counts > 0, world / row_counts.clamp(min=1), 0.0).to(row_sums.dtype)
        loss = (row_sums * weights).sum()

        # Per-adapter means for reporting, over all processes.
        sums = torch.zeros_like(counts).index_add_(0, adapter_ids, row_sums.detach().to(torch.float64))
        if world > 1:
            torch.distributed.all_reduce(sums)
        adapter_losses = torch.where(counts > 0, sums / counts.clamp(min=1), float("nan"))
        return MultiPrefixModelOutput(loss=loss, logits=logits, adapter_losses=adapter_losses, token_counts=counts)

    # ------------------------------------------------------------------ saving and giving the backbone back

    def save_adapter(self, name: str, directory):
        """Write adapter ``name`` as PEFT writes a prompt-learning adapter: ``adapter_config.json`` (its config with
        ``inference_mode`` true) and ``adapter_model.safetensors`` holding one fp32 tensor ``prompt_embeddings``
        (``prompt_encoder_output``: a prefix ``[P, num_layers * 2 * Hkv * head_dim]``, with projection the MLP's
        output). Loads with ``PeftModel.from_pretrained``. Under ``torch.distributed`` every process must call it
        (encoders sharded by FSDP2 are gathered) and only rank 0 writes."""
        from safetensors.torch import save_file

        index = self.adapter_id(name)
        directory = os.fspath(directory)
        if os.path.isfile(directory):
            raise ValueError(f"{directory} is a file; save_adapter writes a directory")
        config = self._configs[index]
        embeddings = _gathered_encoder_output(self.prefix_encoders[index], config)
        if _distributed()[0] != 0:
            return
        os.makedirs(directory, exist_ok=True)
        embeddings = embeddings.to(device="cpu", dtype=torch.float32).contiguous()
        save_file({EMBEDDINGS_KEY: embeddings}, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
        config = copy.deepcopy(config)
        config.inference_mode = True
        config.save_pretrained(directory)

    def save_pretrained(self, directory, adapters: Optional[Sequence[str]] = None):
        """Save every adapter (or those named) to ``directory/<name>/`` with ``save_adapter``."""
        names = self.adapters if adapters is None else list(adapters)
        for name in names:
            self.adapter_id(name)
        for name in names:
            self.save_adapter(name, os.path.join(os.fspath(directory), name))

    def restore(self):
        """Give the backbone back: its previous attention implementation, training mode and checkpointing (its
        parameters stay frozen). The model cannot run afterwards."""
        self._backbone.restore()


def _drop_backbone_entries(module, state_dict, prefix, local_metadata):
    """``MultiPrefixModel.state_dict`` holds the adapters' encoders only: the frozen backbone is the caller's."""
    for key in [key for key in state_dict if key.startswith(prefix + BACKBONE_ATTR + ".")]:
        del state_dict[key]


def _ignore_missing_backbone_entries(module, incompatible_keys):
    """A state dict of ``MultiPrefixModel`` lacks the backbone by design: its absence is no missing key (the keys
    carry the path of the module the load was called on: ``base_model.`` alone, or behind a wrapper's prefix)."""
    backbone_keys = set(module.base_model.state_dict())
    marker = "." + BACKBONE_ATTR + "."

    def is_backbone_key(key):
        _, found, rest = ("." + key).partition(marker)
        return bool(found) and rest in backbone_keys

    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if not is_backbone_key(key)]


class SaveAdaptersCallback(TrainerCallback):
    """``transformers.Trainer`` callback: with every checkpoint, each adapter of the ``MultiPrefixModel`` being
    trained as a plain PEFT directory ``checkpoint-<step>/<adapter>/`` beside Trainer's own files.

    transformers' Trainer hands ``save_pretrained`` only to its own model classes (``PreTrainedModel``,
    ``PeftModel``); for any other module it writes ``model.safetensors`` from ``state_dict()``. For a
    ``MultiPrefixModel`` that file holds the adapters' encoders (projection MLPs included) and is what
    ``resume_from_checkpoint`` loads; this callback adds the adapters as PEFT loads them."""

    def on_save(self, args, state, control, model=None, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        while not isinstance(model, MultiPrefixModel) and hasattr(model, "module"):
            model = model.module  # a DistributedDataParallel wrapper
        if not isinstance(model, MultiPrefixModel):
            raise ValueError(f"SaveAdaptersCallback saves a fastpeft MultiPrefixModel; the Trainer's model is "
                             f"{type(model).__name__}")
        model.save_pretrained(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


# ---------------------------------------------------------------------------------------------------------- trainer


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


class MultiPrefixTrainer:
    """Train N PEFT prefix-tuning adapters together on one frozen causal LM, each with its own optimizer (see the
    module docstring): a loop over a ``MultiPrefixModel`` (``prefix_model``).

    Arguments:
        model: a transformers causal LM (``PreTrainedModel``; full precision or loaded in 4/8 bit through
            bitsandbytes), not a ``PeftModel``. Its parameters are frozen (``requires_grad_(False)``) and it is
            switched to the ``"fastpeft"`` attention implementation; ``restore_model()`` switches it back. On an
            encoder-decoder LM (T5, MT5, BART) the adapters may be prefix, prompt or p-tuning ones
            (``fastpeft.multi_seq2seq``), the records' ``labels`` the decoder's targets.
        lr, weight_decay: of the default optimizer, ``torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)``.
        optimizer_factory: ``callable(params) -> torch.optim.Optimizer``, called once per adapter with that
            adapter's parameters (overrides lr/weight_decay).
        scheduler_factory: ``callable(optimizer) -> lr scheduler``, called once per adapter; a scheduler is stepped
            right after its optimizer, so it counts that adapter's updates, not global steps.
        max_grad_norm: clip each adapter's gradient norm (per adapter) before its update; None = no clipping.
        gradient_checkpointing: activation checkpointing of the backbone (``MultiPrefixModel``'s).
        mixed_precision: None (the backbone's dtype), ``"bf16"`` or ``"fp16"``: the forward runs under
            ``torch.autocast`` of the model's device type; ``"fp16"`` also scales the loss with a ``GradScaler``.
            Adapter parameters and optimizer states stay float32.

    Under ``torch.distributed`` (a process group initialised before the first step) the model is wrapped in
    ``DistributedDataParallel`` (rank 0's initial values are broadcast) and token counts are summed over processes;
    every process must call each training step, and every forward with gradients must be followed by a backward, as
    usual with DDP. A backbone too large for one device is sharded with FSDP2 before the trainer takes it
    (``fastpeft.integration.sharding.shard(model)``: ``fully_shard`` on each decoder layer and on the model); the
    prefix tables then stay whole on every process beside it, rank 0's values are broadcast (again after adapters
    change) and their gradients are averaged over the processes at the end of every backward, as DDP would.
    """

    def __init__(self, model, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimizer_factory: Optional[Callable] = None, scheduler_factory: Optional[Callable] = None,
                 max_grad_norm: Optional[float] = None, gradient_checkpointing: bool = False,
                 mixed_precision: Optional[str] = None):
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of None, 'bf16', 'fp16', got {mixed_precision!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        self.prefix_model = MultiPrefixModel(model, gradient_checkpointing=gradient_checkpointing,
                                             user="MultiPrefixTrainer")
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.autocast_dtype = MIXED_PRECISION[mixed_precision]
        self._scaler = (torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None)
        self._optimizer_factory = optimizer_factory or (
            lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
        self._scheduler_factory = scheduler_factory
        self.max_grad_norm = max_grad_norm
        self._updaters: Dict[str, Updater] = {}
        self._ddp = None  # DistributedDataParallel over prefix_model, rebuilt when adapters change
        # A backbone sharded with FSDP2 (fastpeft.integration.sharding.shard) before the trainer took it: no DDP then.
        self._sharded_backbone = sharding.is_sharded(model)
        self._replicas_synced = False
        self.prefix_model._caller_averages_gradients = self._sharded_backbone

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> List[str]:
        """Adapter names, in the order they were added."""
        return self.prefix_model.adapters

    def encoder(self, name):
        """The PEFT ``PrefixEncoder`` of adapter ``name`` (its parameters are the trainable ones)."""
        return self.prefix_model.encoder(name)

    def config(self, name):
        """The PEFT ``PrefixTuningConfig`` of adapter ``name`` (what ``save_adapter`` writes, with
        ``inference_mode`` set there)."""
        return self.prefix_model.adapter_config(name)

    def optimizer(self, name):
        """The optimizer of adapter ``name``."""
        return self._updater(name).optimizer

    def updates(self, name) -> int:
        """How many optimizer steps adapter ``name`` has taken."""
        return self._updater(name).updates

    def add_adapter(self, name: str, adapter, *, peft_adapter_name: Optional[str] = None,
                    allow_pickle: bool = False):
        """Add a prefix-tuning adapter called ``name``, with its own optimizer (and scheduler): see
        ``MultiPrefixModel.add_adapter`` for what ``adapter`` may be and what is refused."""
        self.prefix_model.add_adapter(name, adapter, peft_adapter_name=peft_adapter_name, allow_pickle=allow_pickle)
        params = list(self.prefix_model.encoder(name).parameters())
        optimizer = self._optimizer_factory(params)
        scheduler = self._scheduler_factory(optimizer) if self._scheduler_factory is not None else None
        self._updaters[name] = Updater(params, optimizer, scheduler)
        self._ddp = None
        self._replicas_synced = False

    def remove_adapter(self, name):
        """Drop adapter ``name`` with its optimizer."""
        self.prefix_model.remove_adapter(name)
        del self._updaters[name]
        self._ddp = None
        self._replicas_synced = False

    def _updater(self, name):
        if name not in self._updaters:
            raise KeyError(f"unknown adapter {name!r} (adapters: {self.adapters})")
        return self._updaters[name]

    # ------------------------------------------------------------------ forward

    def _module(self):
        """The model, through DDP when gradients flow in a multi-process run, unless the backbone is sharded."""
        if _distributed()[1] == 1 or not torch.is_grad_enabled():
            return self.prefix_model
        if self._sharded_backbone:
            # The tables stay replicated beside the FSDP2 backbone: rank 0's values once per set of adapters (as DDP's
            # construction broadcasts them), their gradients averaged after each backward
            # (_average_gradients_after_backward).
            if not self._replicas_synced:
                sharding.broadcast_parameters(self.prefix_model.prefix_encoders.parameters())
                self._replicas_synced = True
            return self.prefix_model
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Adapters absent from a step are unused parameters of that step.
            self._ddp = DistributedDataParallel(self.prefix_model, device_ids=device_ids, find_unused_parameters=True)
        return self._ddp

    def _run(self, batch):
        """``MultiPrefixModelOutput`` of a collated batch (``adapter_ids`` included), under the autocast chosen."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self._module()(**batch)
        if self._sharded_backbone and out.loss is not None and out.loss.requires_grad and _distributed()[1] > 1:
            out.loss.register_hook(self._average_gradients_after_backward)
        return out

    def _average_gradients_after_backward(self, grad):
        """Hook on the loss: once the backward it starts has finished (as DDP's reducer does, through autograd's
        end-of-backward callback), average the replicated tables' gradients over the processes."""
        encoders = self.prefix_model.prefix_encoders
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: sharding.average_gradients(encoders.parameters()))
        return grad

    def _batch(self, input_ids, adapters, attention_mask, labels):
        """The model's batch (adapter names -> ``adapter_ids``, tensors on the model's device)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an integer tensor [B, L], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if isinstance(adapters, str) or len(adapters) != len(input_ids):
            raise ValueError(f"adapters must be a sequence of {len(input_ids)} adapter names (one per row), got "
                             f"{adapters!r}")
        unknown = sorted({str(n) for n in adapters if n not in self._updaters})
        if unknown:
            raise KeyError(f"unknown adapters {unknown} (adapters: {self.adapters})")
        ids = [self.prefix_model.adapter_id(name) for name in adapters]
        to_device = (lambda t: None if t is None else t.to(self.device))
        return {"input_ids": to_device(input_ids), "attention_mask": to_device(attention_mask),
                "labels": to_device(labels), "adapter_ids": torch.tensor(ids, device=self.device)}

    def _named(self, out):
        """``MultiPrefixOutput`` (per-adapter values by name) of a ``MultiPrefixModelOutput``."""
        if out.loss is None:
            return MultiPrefixOutput(logits=out.logits)
        counts, losses = out.token_counts.tolist(), out.adapter_losses.tolist()
        return MultiPrefixOutput(logits=out.logits, loss=out.loss,
                                 adapter_losses={n: losses[i] for i, n in enumerate(self.adapters) if counts[i]},
                                 token_counts={n: int(counts[i]) for i, n in enumerate(self.adapters)})

    def forward(self, input_ids, adapters: Sequence[str], attention_mask=None, labels=None) -> MultiPrefixOutput:
        """Run the backbone on a mixed batch, row b with the prefix of adapter ``adapters[b]`` (B names); the other
        arguments as ``MultiPrefixModel.forward``'s. Returns ``MultiPrefixOutput``. Raises KeyError for unknown
        adapter names, ValueError for bad shapes."""
        return self._named(self._run(self._batch(input_ids, adapters, attention_mask, labels)))

    __call__ = forward

    # ------------------------------------------------------------------ training

    def zero_grad(self):
        """Drop every adapter's gradients."""
        for updater in self._updaters.values():
            updater.zero_grad()

    def training_step(self, input_ids, adapters: Sequence[str], attention_mask=None, labels=None) -> dict:
        """One optimisation step on a mixed batch (arguments as in ``forward``; labels default to input_ids with
        ``-100`` at padding, except on an encoder-decoder, which needs its decoder's targets). The backbone is put in train mode (as transformers' Trainer does; activation
        checkpointing only acts in train mode).

        Every adapter with labelled tokens in the batch (over all processes) takes one step of its own optimizer
        (and scheduler); the others are left exactly as they were.

        Returns ``{"loss": float (the combined loss, summed over processes), "adapter_losses": {name: mean token
        loss over all processes}, "updated": [names stepped]}``.
        """
        batch = self._batch(input_ids, adapters, attention_mask, labels)
        if labels is None and self.prefix_model.encoder_decoder:
            raise ValueError("labels are required to train an encoder-decoder: the decoder's target token ids [B, T]")
        if labels is None:
            mask = batch["attention_mask"]
            batch["labels"] = batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX) if mask is not None else \
                batch["input_ids"].clone()
        return self._step(batch)

    def _step(self, batch):
        """``training_step`` of a collated batch (``adapter_ids`` included)."""
        self.model.train()
        self.zero_grad()
        names = self.adapters

        def with_labelled_tokens(out):
            return [self._updaters[n] for n, count in zip(names, out.token_counts.tolist()) if count > 0]

        out, stepped = optimizer_step(lambda: self._run(batch), list(self._updaters.values()),
                                      stepped=with_labelled_tokens, max_grad_norm=self.max_grad_norm,
                                      scaler=self._scaler)
        out = self._named(out)
        updated = [name for name in names if self._updaters[name] in stepped]
        return {"loss": sum(out.adapter_losses.values()), "adapter_losses": dict(out.adapter_losses),
                "updated": updated}

    def train(self, records: Sequence, *, batch_size: int = 8, epochs: int = 1, max_steps: Optional[int] = None,
              shuffle: bool = True, seed: int = 0, adapter_field: str = "task", max_length: Optional[int] = None,
              pad_token_id: Optional[int] = None, callback: Optional[Callable[[dict], None]] = None) -> List[dict]:
        """Train on tokenized records of several adapters, mixed in every batch.

        records: a sequence (list, ``datasets.Dataset``, ...) of mappings or objects with ``input_ids`` (list of
            ints or 1-D tensor), optional ``labels`` (same length, ``-100`` = no loss; default ``input_ids``: loss on
            every token) and the adapter name under ``adapter_field`` (default ``"task"``). Encoder-decoders: ``input_ids``
            the encoder's input, ``labels`` (required, any length) the decoder's targets.
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
        collator = AdapterBatchCollator(self.adapters, adapter_field=adapter_field, max_length=max_length,
                                        pad_token_id=self._pad_token_id(pad_token_id),
                                        encoder_decoder=self.prefix_model.encoder_decoder)
        collator.check_records(records)
        rank, world = _distributed()
        global_batch = batch_size * world

        def batches():
            for epoch in range(epochs):
                order = (torch.randperm(len(records), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
                         if shuffle else list(range(len(records))))
                for start in range(0, len(order), global_batch):
                    chunk = order[start:start + global_batch]
                    if len(chunk) < world:
                        break  # too few rows left to give every process one
                    yield epoch, collator([records[i] for i in chunk[rank::world]])

        return run_steps(batches(), self._step, max_steps=max_steps, callback=callback)

    def _pad_token_id(self, pad_token_id):
        if pad_token_id is not None:
            return pad_token_id
        configured = getattr(self.model.config, "pad_token_id", None)
        return 0 if configured is None else int(configured)

    # ------------------------------------------------------------------ saving

    def save_adapter(self, name: str, directory):
        """Write adapter ``name`` as a PEFT prefix-tuning adapter directory (``MultiPrefixModel.save_adapter``).
        Under ``torch.distributed`` every process calls it and only rank 0 writes."""
        self.prefix_model.save_adapter(name, directory)

    def save_pretrained(self, directory, adapters: Optional[Sequence[str]] = None):
        """Save every adapter (or those named) to ``directory/<name>/`` with ``save_adapter``."""
        self.prefix_model.save_pretrained(directory, adapters)

    def restore_model(self):
        """Give the backbone back: its previous attention implementation, training mode and checkpointing (its
        parameters stay frozen)."""
        self.prefix_model.restore()
