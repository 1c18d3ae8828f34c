"""``fastpeft.AdapterBank``: many PEFT soft prompts served from one frozen causal LM, mixed within a batch.

Storage. Every adapter becomes per-layer prefix K/V in one entry of the bank's ``PrefixTables``
(``fastpeft.prefix_tables``: one tensor for all adapters, read per row through ``prefix_index``; entry 0 is the empty
"no adapter" one). Prefix tuning (with or without projection) is stored as PEFT saves it: the prompt encoder's output
split into per-layer K/V, never rotated. Prompt tuning and p-tuning are run once, at ``add``, through the frozen model
as a sequence of P virtual tokens at positions ``0 .. P-1`` (``integration.virtual_tokens``), and their per-layer K/V
are stored the same way: a request costs no virtual-token compute.

Positions. A row whose adapter has P virtual tokens has its real tokens at ``P + cumsum(mask) - 1``; a row without
an adapter at ``cumsum(mask) - 1`` (``prefix_tables.pad_aware_positions``): what PEFT gives each row alone.

Serving step. ``route`` maps adapter names to a ``Routing`` (table entries and position offsets) and ``forward``
runs one forward of rows whose positions, cache and table entries the caller chose: the continuous-batching engine
(``fastpeft.serve``) drives the bank through these two alone.

Generation is transformers' own ``generate`` (greedy, sampling, beam search, logits processors, stopping criteria,
streamers), with every step's inputs extended by the rows' prefixes and positions. The cache (transformers'
``DynamicCache``) holds only the rows' own tokens; every step reads the prefixes from the bank through
``prefix_index`` (for L == 1 the dispatcher picks the split-KV decode kernels).
"""

import contextlib
import copy
from dataclasses import dataclass

import torch

from .adapters import PREFIX_TUNING, check_compatible, load_prompt_adapter, prefix_key_values
from .backbone import FrozenBackbone
from .integration.attention import PREFIX_KWARG, generating_with_prefix
from .integration.virtual_tokens import virtual_token_key_values
from .prefix_tables import NO_ADAPTER_SLOT, PrefixTables, Routing, pad_aware_positions
from .sampling import resolve_sampling

__all__ = ["AdapterBank", "BankOutput", "NO_ADAPTER_SLOT", "Routing"]


@dataclass
class BankOutput:
    """Result of ``AdapterBank.__call__``. logits: ``[B, L, vocab]`` at the input's positions (no virtual tokens)."""

    logits: torch.Tensor


class AdapterBank:
    """Serve PEFT prefix-tuning, prompt-tuning and p-tuning adapters of one frozen causal LM, one adapter per row.

    ``AdapterBank(base_model)`` switches ``base_model`` (a transformers causal LM instance, full precision or
    bitsandbytes 4/8-bit) to the ``"fastpeft"`` attention implementation and to eval mode for as long as the bank
    is open. Called without the bank's prefix keyword, that implementation computes plain causal attention, so the
    model gives the same outputs if used directly meanwhile (through fastpeft's kernels). ``bank.close()`` (or
    leaving ``with AdapterBank(...) as bank:``) restores the previous attention implementation and training mode.
    The switch is made once rather than around every call: switching is cheap, but switching back and forth on
    every request would mutate the shared model under any other user of the instance (another thread, another
    bank, an accelerated PeftModel on the same backbone), which then silently runs with the wrong implementation.

    Not thread-safe: do not ``add``/``remove`` while another thread serves from the same bank.

    Example::

        bank = AdapterBank(model)
        bank.add("tenant-a", "path/to/peft_adapter_dir")
        bank.add("tenant-b", peft_model)
        out = bank(input_ids, attention_mask=mask, adapters=["tenant-a", None, "tenant-b"])
        tokens = bank.generate(input_ids, attention_mask=mask, adapters=[...], max_new_tokens=32)
    """

    def __init__(self, base_model, initial_capacity=4):
        devices = set((getattr(base_model, "hf_device_map", None) or {}).values())
        if len(devices) > 1:
            raise ValueError(f"the base model is split over several devices ({sorted(map(str, devices))}); "
                             "AdapterBank keeps its prefix tables on one device and needs the model on it")
        if not isinstance(initial_capacity, int) or initial_capacity < 1:
            raise ValueError(f"initial_capacity must be a positive integer, got {initial_capacity!r}")
        self._backbone = FrozenBackbone(
            base_model, "AdapterBank", eval_mode=True,
            peft_hint="pass peft_model.get_base_model() and add the PeftModel to the bank with bank.add(name, "
                      "peft_model)")
        self.model, self.geometry = base_model, self._backbone.geometry
        self.device, self.dtype = self._backbone.device, self._backbone.dtype
        g = self.geometry
        self._tables = PrefixTables(g.num_layers, g.num_kv_heads, g.head_dim, initial_capacity, self.device,
                                    self.dtype)
        self._slot_by_name = {}
        self._closed = False

    # ----- lifecycle -------------------------------------------------------------------------------------------

    def close(self):
        """Give the base model back: restore its attention implementation and training mode, free the tables.
        Idempotent; the bank cannot serve afterwards."""
        if self._closed:
            return
        self._backbone.restore()
        self._tables = None
        self._slot_by_name.clear()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _check_open(self, runs_model=True):
        if self._closed:
            raise RuntimeError("this AdapterBank is closed")
        if runs_model:
            self._backbone.check_attention()

    # ----- adapters --------------------------------------------------------------------------------------------

    def add(self, name, adapter, allow_pickle=False, adapter_name=None):
        """Add a PEFT prompt-learning adapter under ``name``.

        ``adapter`` is a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) or an
        in-memory ``PeftModel`` (its adapter ``adapter_name``, default the active one; a prefix with projection is
        evaluated once). A pickle-only directory (``adapter_model.bin``) is refused unless ``allow_pickle=True``.
        The adapter must be a causal-LM prefix-tuning, prompt-tuning or p-tuning adapter for this base model's
        layout; otherwise ``ValueError`` names what differs. Names are unique (``ValueError`` for a duplicate).
        Nothing changes if it raises. Prompt tuning and p-tuning run their virtual tokens through the model here,
        once.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._slot_by_name:
            raise ValueError(f"the bank already holds an adapter named {name!r}; remove it first to replace it")
        loaded = load_prompt_adapter(adapter, allow_pickle=allow_pickle, adapter_name=adapter_name)
        check_compatible(loaded, self.geometry)
        with torch.inference_mode():
            if loaded.peft_type == PREFIX_TUNING:
                keys, values = prefix_key_values(loaded, self.geometry)
            else:
                # A prefixless forward: the bank's model runs fastpeft attention, plain causal without the keyword.
                prompts = loaded.embeddings.to(self.device, self.dtype).unsqueeze(0)
                keys, values = virtual_token_key_values(self.model, prompts)
            self._slot_by_name[name] = self._tables.store(torch.stack(keys), torch.stack(values))

    def remove(self, name):
        """Remove adapter ``name`` (``KeyError`` if absent); its table entry is zeroed and reused by later adds."""
        self._check_open(runs_model=False)
        if name not in self._slot_by_name:
            raise KeyError(f"no adapter named {name!r} in the bank (it holds {sorted(self._slot_by_name)})")
        self._tables.free(self._slot_by_name.pop(name))

    def __contains__(self, name):
        return name in self._slot_by_name

    def __len__(self):
        return len(self._slot_by_name)

    @property
    def names(self):
        """The adapters' names, in the order they were added."""
        return list(self._slot_by_name)

    def slot_of(self, name):
        """The table entry (``prefix_index`` value) of adapter ``name``; entry 0 is the empty 'no adapter' one."""
        if name not in self._slot_by_name:
            raise KeyError(f"no adapter named {name!r} in the bank")
        return self._slot_by_name[name]

    def num_virtual_tokens(self, name):
        """How many virtual tokens adapter ``name`` has (where its rows' real tokens start)."""
        return self._tables.length(self.slot_of(name))

    @property
    def capacity(self):
        """How many adapters fit before the tables grow."""
        return 0 if self._closed else self._tables.capacity

    @property
    def storage_bytes(self):
        """Bytes held by the prefix tables (keys, values and lengths)."""
        return 0 if self._closed else self._tables.nbytes

    # ----- serving ---------------------------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, adapters=None):
        """Logits of a batch whose rows use different adapters.

        Arguments:
            input_ids: ``[B, L]`` integer token ids, left- or right-padded.
            attention_mask: ``[B, L]`` 0/1 (or bool), 1 = real token; None = no padding.
            adapters: one adapter name or None (no adapter) per row; None = no adapter for every row.

        Returns ``BankOutput`` with ``logits [B, L, vocab]``. Row b's logits at its real tokens equal those of PEFT
        running that row alone, unpadded, with its adapter (the base model alone for None). Unknown names raise
        ``KeyError`` naming them.
        """
        self._check_open()
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        routing = self.route(adapters, input_ids.shape[0])
        with torch.inference_mode():
            logits = self.forward(input_ids, attention_mask,
                                  pad_aware_positions(attention_mask, routing.position_offsets), routing.prefix_index)
        return BankOutput(logits=logits)

    def generate(self, input_ids, attention_mask=None, adapters=None, generator=None, **generate_kwargs):
        """Generate for a batch whose rows use different adapters, through transformers' own ``generate``.

        Arguments:
            input_ids, attention_mask, adapters: as in ``__call__``. Every row needs at least one real token.
            generator: a ``torch.Generator`` to sample from; None = torch's global generator (as transformers). The
                draws are those transformers' sampling makes from the global generator in the generator's state,
                which the generator then takes over.
            generate_kwargs: anything the model's ``generate`` takes, with its meaning and defaults (the model's
                generation config first): ``max_new_tokens``, greedy / ``do_sample`` with ``temperature``,
                ``top_k``, ``top_p``, beam search (``num_beams``, ``num_return_sequences``, ``length_penalty``),
                ``repetition_penalty``, ``logits_processor``, ``stopping_criteria``, ``stop_strings`` (with
                ``tokenizer=``), ``streamer``, ``return_dict_in_generate`` with ``output_scores``/``output_logits``,
                ``eos_token_id`` (an id or a list; an empty list: rows never end early), ``pad_token_id``.
                ``position_ids``, ``past_key_values``/``cache``, ``inputs_embeds`` and fastpeft's prefix keyword are
                set by the bank and refused.

        Returns what ``model.generate`` returns: ``[B * num_return_sequences, L + n]`` token ids (or its output
        dataclass), rows ended early padded with the pad id. Each row decodes with its own adapter's prefix, read
        from the bank at every step (the cache holds only the rows' own tokens; beams of a row share its prefix).
        Greedy tokens of each row equal those of PEFT's forward looped over that row alone, unpadded
        (``fastpeft.integration.reference_generate``).
        """
        self._check_open()
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        reserved = sorted({"position_ids", "past_key_values", "cache", "inputs_embeds", PREFIX_KWARG}
                          & set(generate_kwargs))
        if reserved:
            raise ValueError(f"AdapterBank.generate sets {', '.join(reserved)} itself; do not pass it")
        max_new_tokens = generate_kwargs.setdefault("max_new_tokens", 20)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if generate_kwargs.get("do_sample"):
            resolve_sampling(getattr(self.model, "generation_config", None), generate_kwargs.get("temperature"),
                             generate_kwargs.get("top_k"), generate_kwargs.get("top_p"))
        empty_rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"attention_mask: rows {empty_rows} have no real token to continue from")
        routing = self.route(adapters, input_ids.shape[0])
        if max_new_tokens == 0:
            return input_ids.clone()
        if generate_kwargs.get("eos_token_id") == []:
            # transformers reads None as "the generation config's eos": a config without one says "never stop".
            # The other generation parameters go into that config too: transformers deprecates passing both.
            config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.model.generation_config)
            del generate_kwargs["eos_token_id"]
            generate_kwargs = dict(config.update(**generate_kwargs), generation_config=config)
            config.eos_token_id = None

        B = input_ids.shape[0]
        steps = {}  # by the number of rows per input row (beams, return sequences): (spec, position offsets)

        def add_prefixes(model_inputs):
            # transformers numbers positions pad-aware, cumsum(mask) - 1, as the bank does; a row's adapter adds P.
            position_ids = model_inputs.get("position_ids")
            if position_ids is None:
                raise ValueError(f"{type(self.model).__name__}.generate passed no position_ids; the bank needs them "
                                 "to place each row's tokens after its adapter's virtual tokens")
            copies = position_ids.shape[0] // B
            if copies not in steps:
                rows = routing.repeat_interleave(copies)
                steps[copies] = (self._tables.spec(rows.prefix_index), rows.position_offsets.unsqueeze(1))
            spec, row_offsets = steps[copies]
            model_inputs["position_ids"] = position_ids + row_offsets
            return spec

        # transformers continues every row from its last column: move right padding (or any pad not at the left) to
        # the left, keeping the real tokens' order, and put the caller's layout back in front of the new tokens.
        left_aligned = bool(attention_mask[:, -1].all())
        if left_aligned:
            ids, mask = input_ids, attention_mask
        else:
            order = torch.argsort(attention_mask, dim=1, stable=True)
            ids, mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        with torch.inference_mode(), _drawing_from(generator), \
                generating_with_prefix(self.model, add_prefixes, "the adapters' prefixes"):
            out = self.model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
        if left_aligned:
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        copies = sequences.shape[0] // B
        sequences = torch.cat([input_ids.repeat_interleave(copies, 0), sequences[:, input_ids.shape[1]:]], 1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out

    # ----- the serving step ------------------------------------------------------------------------------------

    def route(self, adapters, batch_size):
        """The ``Routing`` of ``batch_size`` rows with ``adapters`` (one name or None per row; None = no adapter for
        every row): each row's table entry and position offset (its adapter's number of virtual tokens). Raises
        ``KeyError`` naming unknown adapters."""
        self._check_open(runs_model=False)
        if adapters is None:
            adapters = [None] * batch_size
        elif isinstance(adapters, str):
            raise ValueError("adapters must be a sequence with one adapter name (or None) per row, not a string")
        adapters = list(adapters)
        if len(adapters) != batch_size:
            raise ValueError(f"adapters names {len(adapters)} rows but input_ids has {batch_size}")
        unknown = sorted({repr(a) for a in adapters if a is not None and a not in self._slot_by_name})
        if unknown:
            raise KeyError(f"unknown adapter name(s) {', '.join(unknown)}; the bank holds {sorted(self._slot_by_name)}")
        return self._tables.routing([NO_ADAPTER_SLOT if a is None else self._slot_by_name[a] for a in adapters])

    def forward(self, input_ids, attention_mask, position_ids, prefix_index, cache=None, logits_to_keep=0):
        """One forward of the model with the bank's prefixes: the serving step, for callers that manage their own
        batch (the continuous-batching engine). Unlike ``__call__`` nothing is checked or derived: the caller passes

            input_ids ``[B, L]`` (on the bank's device), attention_mask ``[B, S]`` over the cached and new keys,
            position_ids ``[B, L]`` (PEFT's numbering, virtual tokens first: ``pad_aware_positions`` of a prompt,
            ``offset + cached tokens`` of a decode step), prefix_index ``[B]`` int32 (a ``Routing``'s, or entries
            from ``slot_of``/``NO_ADAPTER_SLOT``), cache: a transformers cache of the rows' own tokens (filled in
            place) or None, logits_to_keep: 0 for every position's logits, else the last ones only.

        Returns the logits ``[B, L or logits_to_keep, vocab]``. Call under ``torch.inference_mode()``."""
        self._check_open()
        return self._backbone.forward(self._tables.spec(prefix_index), "the adapters' prefixes", input_ids=input_ids,
                                      attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                      logits_to_keep=logits_to_keep)

    # ----- helpers ---------------------------------------------------------------------------------------------

    def _check_inputs(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, L] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must hold at least one row and one token, got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device, torch.long)
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask))}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise ValueError(f"attention_mask must be bool or integer 0/1, got {attention_mask.dtype}")
        attention_mask = attention_mask.to(self.device, torch.long)
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1")
        return input_ids, attention_mask

@contextlib.contextmanager
def _drawing_from(generator):
    """For the block, torch's global generator of ``generator``'s device draws what ``generator`` would (its state
    is loaded), and ``generator`` then holds the state the draws left; transformers' sampling knows only the global
    generator. A no-op for None."""
    if generator is None:
        yield
        return
    device = generator.device
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else "cpu"):
        if cuda:
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.set_rng_state(generator.get_state())
        try:
            yield
        finally:
            generator.set_state(torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state())
