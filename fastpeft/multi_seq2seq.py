"""``MultiPrefixModel`` on encoder-decoder LMs (T5, MT5, BART): ``fastpeft.MultiPrefixModel(model)`` (and so
``MultiPrefixTrainer``) builds this one for a model whose config says ``is_encoder_decoder``.

Several tenants' PEFT ``SEQ_2_SEQ_LM`` adapters, of all three prompt-learning kinds and each with its own number of
virtual tokens, train together from batches whose rows belong to different tenants; every row runs as PEFT's
``PeftModelForSeq2SeqLM.forward`` runs it alone, so each tenant gets the loss and the gradient PEFT gives it on its
own rows:

- Prompt tuning and p-tuning: PEFT puts the first P of the prompt encoder's ``P * num_transformer_submodules``
  virtual-token embeddings in front of the encoder's input (the encoder's mask gets P ones; the decoder and the labels
  are left as they are). Here each step runs every prompt adapter with rows in the batch once
  (``multi.prompt_encoder_output``) and lays every row out as ``[its virtual tokens ; its real tokens ; padding]``
  (``prefix_tables.pack_encoder_rows``, the encoder-decoder bank's layout): each row carries its own adapter's count
  and the batch is as wide as its longest row.
- Prefix tuning: PEFT hands the decoder's self-attention a prefix cache (decoder layer i reads the adapter's layer
  ``2i mod num_layers``: ``adapters.encoder_decoder_prefix_layers``), the encoder and the cross-attention none, and
  the decoder numbers its tokens after it (BART's position embedding per row, ``compat.decoder_positions_shifted``;
  T5's relative bias over each row's own prefix columns, ``attention.DecoderSelfAttentionPrefix.relative_bias``). Here
  one differentiable prefix table per decoder layer holds the prefix adapters with rows in the batch (entry 0 empty,
  for the other rows), read per row through ``prefix_index``.

Padding: every row's encoder tokens sit at ``0 .. P+L-1`` whichever side the caller padded (``pack_encoder_rows``), as
PEFT runs the row alone, unpadded. With right padding (what ``fastpeft.data.collate`` makes) that is also what PEFT
gives the padded batch; with left padding PEFT's own batch would put the padding between a prompt and its row (and
shift BART's absolute positions), which no row means. Labels are the decoder's targets ``[B, T]``, right-padded with
``-100``; the decoder's input is the model's own shift of them (``prepare_decoder_input_ids_from_labels``, the start
token first) unless ``decoder_input_ids`` are given. The loss is ``MultiPrefixModel``'s (each adapter's mean token
loss, summed), with the label at each decoder position (no shift: the decoder's input is already shifted).
"""

import copy

import torch
import torch.nn.functional as F

from .adapters import (PREFIX_TUNING, PROMPT_LEARNING_TYPES, PROMPT_TUNING, PromptAdapter, check_compatible,
                       encoder_decoder_prefix_layers, load_prompt_adapter, plain_config)
from .integration import compat
from .integration.attention import PREFIX_KWARG, DecoderSelfAttentionPrefix, PrefixSpec, autocast_dtype
from .integration.peft.checks import (check_decoder_positions_shiftable, check_encoder_decoder_prefix,
                                      check_no_layerdrop, decoder_self_attention_layers)
from .multi import MultiPrefixModel, MultiPrefixModelOutput, prompt_encoder_output
from .prefix_tables import pack_encoder_rows

__all__ = ["EncoderDecoderMultiPrefixModel"]

SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"


class EncoderDecoderMultiPrefixModel(MultiPrefixModel):
    """``MultiPrefixModel`` for an encoder-decoder backbone (see the module docstring); made by
    ``fastpeft.MultiPrefixModel(model)``. Its adapters are PEFT ``SEQ_2_SEQ_LM`` prefix-tuning, prompt-tuning and
    p-tuning adapters (``add_adapter`` takes their configs, saved directories or ``PeftModel``s); ``prefix_encoders``
    holds each one's PEFT prompt encoder (``PrefixEncoder``, ``PromptEmbedding`` or ``PromptEncoder``), the only
    trainable parameters.

    A prefix-tuning adapter whose ``num_layers`` the decoder outnumbers, or whose heads the decoder's self-attention
    does not have, is refused at ``add_adapter`` by name, as ``fastpeft.accelerate`` and ``AdapterBank`` refuse it
    (PEFT fails on it); so is one on a backbone with LayerDrop.
    """

    encoder_decoder = True
    _LABEL_SHIFT = 0

    def __init__(self, model, *, gradient_checkpointing: bool = False, user: str = "MultiPrefixModel"):
        super().__init__(model, gradient_checkpointing=gradient_checkpointing, user=user)
        try:
            # The decoder self-attention modules the prefix keyword is meant for, told apart from the others.
            self._decoder_layers = len(decoder_self_attention_layers(model))
        except ValueError:
            self._backbone.restore()
            raise

    # ------------------------------------------------------------------ adapters

    def _is_prefix(self, index):
        return self._configs[index].peft_type == PREFIX_TUNING  # PEFT's PeftType is a str enum

    def _check_adapter(self, adapter):
        """Refuse ``adapter`` (a ``PromptAdapter``: what PEFT saves) unless it is a seq2seq prompt-learning adapter
        of this backbone's layout whose prefix, if any, the decoder can read as PEFT does."""
        check_compatible(adapter, self.geometry, task_type=SEQ_2_SEQ_LM, encoder_decoder=True)
        if adapter.peft_type == PREFIX_TUNING:
            g = self.geometry
            check_encoder_decoder_prefix(f"prefix-tuning adapter {adapter.source}",
                                         adapter.config.get("num_transformer_submodules"), g.num_layers,
                                         g.num_kv_heads, self.base_model)
            check_decoder_positions_shiftable(self.base_model, self._backbone.user)
            check_no_layerdrop(self.base_model, self._backbone.user)

    def _check_encoder(self, config, encoder, source):
        """``_check_adapter`` of a config and its prompt encoder, through what PEFT would save of them."""
        settings = plain_config(config)
        if settings["peft_type"] not in PROMPT_LEARNING_TYPES:
            raise ValueError(f"{source}: {self._backbone.user} trains {', '.join(PROMPT_LEARNING_TYPES)} adapters, "
                             f"got {settings['peft_type']}")
        with torch.no_grad():
            embeddings = prompt_encoder_output(encoder, config).detach().to("cpu", torch.float32)
        self._check_adapter(PromptAdapter(settings["peft_type"], settings, embeddings, source))

    def _new_encoder(self, config):
        """PEFT's prompt encoder for ``config``, built as ``PeftModel`` builds it (``_setup_prompt_encoder``)."""
        from peft.tuners.p_tuning.model import PromptEncoder
        from peft.tuners.prefix_tuning.model import PrefixEncoder
        from peft.tuners.prompt_tuning.model import PromptEmbedding

        if config.peft_type == PREFIX_TUNING:
            return PrefixEncoder(config)
        if config.peft_type == PROMPT_TUNING:
            return PromptEmbedding(config, self.base_model.get_input_embeddings())
        return PromptEncoder(config)

    def _create(self, config):
        from peft.utils import _prepare_prompt_learning_config

        settings = plain_config(config)
        if settings["peft_type"] not in PROMPT_LEARNING_TYPES:
            raise ValueError(f"config: {self._backbone.user} trains {', '.join(PROMPT_LEARNING_TYPES)} adapters, "
                             f"got {settings['peft_type']}")
        if settings["task_type"] not in (None, SEQ_2_SEQ_LM):
            raise ValueError(f"config: task_type must be {SEQ_2_SEQ_LM} on the encoder-decoder "
                             f"{type(self.base_model).__name__}, got {settings['task_type']}")
        config = copy.deepcopy(config)
        if config.task_type is None:
            config.task_type = SEQ_2_SEQ_LM
        config.inference_mode = False
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 2  # what PeftModel sets for SEQ_2_SEQ_LM
        config = _prepare_prompt_learning_config(config, self.base_model.config)
        # As the causal model: the model's own name, or one the caller put in the config.
        config.base_model_name_or_path = (self.base_model.__dict__.get("name_or_path", None)
                                          or config.base_model_name_or_path)
        encoder = self._new_encoder(config)
        self._check_encoder(config, encoder, "config")
        return config, encoder

    def _load_directory(self, path, allow_pickle):
        from peft import PeftConfig

        saved = load_prompt_adapter(path, allow_pickle=allow_pickle)
        self._check_adapter(saved)
        config = PeftConfig.from_peft_type(**saved.config)
        # The saved tensor is the encoder's output (a projection prefix's or p-tuning head's included): PEFT loads it
        # into a plain table, built in inference mode; training continues on that table.
        config.inference_mode = True
        encoder = self._new_encoder(config)
        with torch.no_grad():  # check_compatible checked the shape
            encoder.embedding.weight.copy_(saved.embeddings)
        return config, encoder

    def forward(self, input_ids, attention_mask=None, labels=None, adapter_ids=None,
                decoder_input_ids=None) -> MultiPrefixModelOutput:
        """Run the backbone on a mixed batch, row b with adapter ``adapter_ids[b]`` (see the module docstring).

        Arguments:
            input_ids: ``[B, L]`` the encoder's input token ids, padded on either side (every row needs a real token).
            attention_mask: ``[B, L]`` 0/1 or bool, 1 = real token; default all real.
            labels: ``[B, T]`` the decoder's target ids or None; ``-100`` = no loss (right padding).
            adapter_ids: ``[B]`` integers (a tensor or a sequence), indices into ``adapters``.
            decoder_input_ids: ``[B, T]`` the decoder's input; default the labels shifted right (the model's start
                token first), or the start token alone without labels.

        Returns ``MultiPrefixModelOutput`` with the decoder's ``logits [B, T, vocab]``. Raises IndexError for an adapter
        index out of range, ValueError for bad shapes or types.
        """
        self._backbone.check_attention()
        input_ids, attention_mask, _, adapter_ids = self._check_batch(input_ids, attention_mask, None, adapter_ids)
        labels, decoder_input_ids = self._check_decoder_batch(input_ids.shape[0], labels, decoder_input_ids,
                                                              input_ids.device)
        if not bool(attention_mask.bool().any(dim=1).all()):
            raise ValueError("every row of attention_mask needs a real token (a 1)")
        rows_per_adapter, counts, world = self._statistics(adapter_ids, labels)
        # The adapters with rows on any process, in adapter order: every process runs the same parameters.
        present = rows_per_adapter.nonzero().flatten().tolist()
        prompts = [i for i in present if not self._is_prefix(i)]
        prefixes = [i for i in present if self._is_prefix(i)]

        embed = self.base_model.get_input_embeddings()
        embeddings = embed(input_ids)  # PEFT's word embeddings (BART's scaled ones)
        row_prompts, prompt_lengths = self._row_prompts(prompts, adapter_ids, embeddings.dtype)
        packed, encoder_mask = pack_encoder_rows(embeddings, attention_mask.to(torch.long), row_prompts,
                                                 prompt_lengths)
        encoder_outputs = self.base_model.get_encoder()(inputs_embeds=packed, attention_mask=encoder_mask)

        arguments = dict(encoder_outputs=encoder_outputs, attention_mask=encoder_mask,
                         decoder_input_ids=decoder_input_ids, use_cache=False)
        if prefixes:
            spec, position_offsets = self._decoder_prefix(prefixes, adapter_ids,
                                                          autocast_dtype(input_ids.device.type, embed.weight.dtype))
            with compat.decoder_positions_shifted(self.base_model, position_offsets):
                logits = self.base_model(**arguments, **{PREFIX_KWARG: spec}).logits
            spec.check_consumed(type(self.base_model).__name__, "the adapters' prefixes")
        else:
            logits = self.base_model(**arguments).logits
        if labels is None:
            return MultiPrefixModelOutput(logits=logits)
        return self._loss(logits, labels, adapter_ids, counts, world)

    def _check_decoder_batch(self, batch_size, labels, decoder_input_ids, device):
        """``(labels, decoder_input_ids)`` on ``device``, checked; the decoder's input made from the labels (the
        model's own shift) or its start token where not given."""
        for tensor, what in ((labels, "labels"), (decoder_input_ids, "decoder_input_ids")):
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[0] != batch_size or \
                    tensor.shape[1] == 0 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
                raise ValueError(f"{what} must be an integer tensor [B={batch_size}, T >= 1], got "
                                 f"{getattr(tensor, 'dtype', type(tensor).__name__)} of shape "
                                 f"{tuple(getattr(tensor, 'shape', ()))}")
        if labels is not None and decoder_input_ids is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and decoder_input_ids {tuple(decoder_input_ids.shape)} "
                             "must have one shape")
        labels = None if labels is None else labels.to(device, torch.long)
        if decoder_input_ids is not None:
            return labels, decoder_input_ids.to(device, torch.long)
        if labels is not None:
            return labels, self.base_model.prepare_decoder_input_ids_from_labels(labels=labels)
        start = self.base_model.config.decoder_start_token_id
        if start is None:
            raise ValueError("decoder_input_ids or labels are required: the model config has no "
                             "decoder_start_token_id")
        return labels, torch.full((batch_size, 1), start, dtype=torch.long, device=device)

    def _row_prompts(self, prompts, adapter_ids, dtype):
        """``(row_prompts [B, W, hidden], prompt_lengths [B])`` for ``pack_encoder_rows``: row b's adapter's first P
        virtual-token embeddings (PEFT's encoder reads the first P of its ``P * num_transformer_submodules``), zeros
        after them; none (length 0) for a prefix-tuning row. ``prompts``: the prompt adapters with rows (on any
        process), each run once; W is the longest of this batch's rows."""
        B, device = adapter_ids.shape[0], adapter_ids.device
        if not prompts:
            return torch.zeros(B, 0, self.geometry.hidden_size, device=device, dtype=dtype), \
                torch.zeros(B, dtype=torch.long, device=device)
        lengths = [int(self._configs[i].num_virtual_tokens) for i in prompts]
        width = max(lengths)
        outputs = [prompt_encoder_output(self.prefix_encoders[i], self._configs[i])[:length].to(dtype)
                   for i, length in zip(prompts, lengths)]
        # Entry 0: no prompt.
        table = torch.stack([outputs[0].new_zeros(width, outputs[0].shape[1])]
                            + [F.pad(output, (0, 0, 0, width - output.shape[0])) for output in outputs])
        entry_of = torch.zeros(len(self._names), dtype=torch.long, device=device)
        entry_of[prompts] = torch.arange(1, len(prompts) + 1, device=device)
        entry_lengths = torch.tensor([0] + lengths, dtype=torch.long, device=device)
        rows = entry_of[adapter_ids]
        row_lengths = entry_lengths[rows]
        return table[rows, :int(row_lengths.max())], row_lengths

    def _decoder_prefix(self, prefixes, adapter_ids, dtype):
        """The decoder's self-attention prefix of the prefix-tuning adapters ``prefixes`` (with rows on any process),
        and each row's position offset (its prefix length, 0 for other rows). One table per decoder layer, entry 0
        empty for the rows without a prefix, decoder layer i reading the adapters' layer ``2i mod num_layers``."""
        device = adapter_ids.device
        lengths = [int(self._configs[i].num_virtual_tokens) for i in prefixes]
        keys, values = self._tables(prefixes, lengths, dtype)
        order = encoder_decoder_prefix_layers(self.geometry.num_layers, self._decoder_layers)

        def with_empty_entry(table):
            return torch.cat([table.new_zeros(1, *table.shape[1:]), table])

        keys = [with_empty_entry(keys[i]) for i in order]
        values = [with_empty_entry(values[i]) for i in order]
        entry_of = torch.zeros(len(self._names), dtype=torch.int32, device=device)
        entry_of[prefixes] = torch.arange(1, len(prefixes) + 1, dtype=torch.int32, device=device)
        prefix_lengths = torch.tensor([0] + lengths, dtype=torch.int32, device=device)
        prefix_index = entry_of[adapter_ids]
        # Indices and lengths are valid by construction: skip the spec's device-syncing value checks.
        spec = PrefixSpec.build(keys, values, prefix_index, prefix_lengths, check_values=False)
        relative_bias = compat.decoder_relative_bias(self.base_model)
        position_offsets = prefix_lengths.to(torch.long)[prefix_index.to(torch.long)]
        return DecoderSelfAttentionPrefix(spec, relative_bias=relative_bias), position_offsets
