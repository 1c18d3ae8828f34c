"""``fastpeft.AdapterBank``: many PEFT soft prompts served from one frozen causal LM, mixed within a batch.

Storage. Every adapter becomes per-layer prefix K/V. All of them live in one tensor
``[2, num_layers, T, Hkv, P_max, head_dim]`` (keys, values) on the model's device, in the model's dtype; layer i's
tables are the views ``[T, Hkv, P_max, head_dim]`` the fused attention reads through ``prefix_index`` (one table entry
per row) and ``prefix_lengths`` (``[T]``, each entry's number of virtual tokens; entries past it are invisible).
Entry 0 is permanently empty (length 0): rows without an adapter point at it. ``T`` grows by doubling, ``P_max`` to
the longest adapter ever added (it never shrinks; the kernels read only each entry's valid length); a removed
adapter's entry is zeroed and reused by the next ``add``.

Adapters. Prefix tuning (with or without projection) is stored as PEFT saves it: the prompt encoder's output split
into per-layer K/V, never rotated. Prompt tuning and p-tuning are run once, at ``add``, through the frozen model as a
sequence of P virtual tokens at positions ``0 .. P-1`` (causal among themselves, so their K/V, RoPE included, never
depend on what follows), and their per-layer K/V are stored the same way: a request costs no virtual-token compute.

Positions. A row whose adapter has P virtual tokens has its real tokens at ``P + cumsum(mask) - 1``; a row without
an adapter at ``cumsum(mask) - 1``. That is what PEFT does for one unpadded row (prefix tuning: real tokens at
``P .. P+L-1``; prompt tuning: the same over the concatenation), so each padded row of a mixed batch gets what PEFT
gives it alone.

Generation is transformers' own ``generate`` (greedy, sampling, beam search, logits processors, stopping criteria,
streamers), with every step's inputs extended by the rows' prefixes and positions. The cache (transformers'
``DynamicCache``) holds only the rows' own tokens; every step reads the prefixes from the bank through
``prefix_index`` (for L == 1 the dispatcher picks the split-KV decode kernels).
"""

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch

from .adapters import PREFIX_TUNING, BaseGeometry, check_compatible, load_prompt_adapter, prefix_key_values
from .integration import compat
from .integration.attention import (ATTN_IMPLEMENTATION, PREFIX_KWARG, GenerationStepChecks, PrefixSpec,
                                    check_supported_model, use_fastpeft_attention)

NO_ADAPTER_SLOT = 0
# transformers' global defaults for sampling arguments that neither the caller nor the generation config sets.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


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
        if hasattr(base_model, "peft_config"):
            raise ValueError("AdapterBank takes the base transformers model, not a PeftModel: pass "
                             "peft_model.get_base_model() and add the PeftModel to the bank with bank.add(name, "
                             "peft_model)")
        if getattr(base_model.config, "is_encoder_decoder", False) or not base_model.can_generate():
            raise ValueError(f"AdapterBank serves decoder-only causal LMs; got {type(base_model).__name__}")
        check_supported_model(base_model, "AdapterBank")
        compat.warn_if_untested("AdapterBank")
        if not isinstance(initial_capacity, int) or initial_capacity < 1:
            raise ValueError(f"initial_capacity must be a positive integer, got {initial_capacity!r}")
        devices = set((getattr(base_model, "hf_device_map", None) or {}).values())
        if len(devices) > 1:
            raise ValueError(f"the base model is split over several devices ({sorted(map(str, devices))}); "
                             "AdapterBank keeps its prefix tables on one device and needs the model on it")
        self.model = base_model
        self.geometry = BaseGeometry.of(base_model.config)
        self.geometry.require_uniform("AdapterBank")  # one table layout for every layer
        embedding = base_model.get_input_embeddings().weight
        # Hidden states (hence q/k/v) take the embeddings' dtype, also when the linear layers are quantized.
        self.device, self.dtype = embedding.device, embedding.dtype
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(base_model.forward).parameters

        g = self.geometry
        # One entry for the permanent empty slot plus room for the requested number of adapters. P_max starts at 1,
        # not 0, so that the tables never have a zero-size prefix axis (an entry's length, not P_max, decides what
        # is visible; no backend has to handle an empty axis). The tables are only ever touched under inference
        # mode.
        with torch.inference_mode():
            self._kv = torch.zeros(2, g.num_layers, initial_capacity + 1, g.num_kv_heads, 1, g.head_dim,
                                   device=self.device, dtype=self.dtype)
            self._lengths = torch.zeros(initial_capacity + 1, dtype=torch.int32, device=self.device)
        self._lengths_host = [0] * (initial_capacity + 1)
        self._slot_by_name = {}
        self._free_slots = set(range(1, initial_capacity + 1))
        self._refresh_layer_views()

        self._previous_attn_implementation = use_fastpeft_attention(base_model)
        self._was_training = base_model.training
        base_model.eval()
        self._closed = False

    # ----- lifecycle -------------------------------------------------------------------------------------------

    def close(self):
        """Give the base model back: restore its attention implementation and training mode, free the tables.
        Idempotent; the bank cannot serve afterwards."""
        if self._closed:
            return
        compat.set_attn_implementation(self.model, self._previous_attn_implementation)
        self.model.train(self._was_training)
        self._kv = self._lengths = None
        self._layer_keys = self._layer_values = ()
        self._slot_by_name.clear()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _check_open(self, runs_model=True):
        if self._closed:
            raise RuntimeError("this AdapterBank is closed")
        if not runs_model:
            return
        current = self.model.config._attn_implementation
        if current != ATTN_IMPLEMENTATION:
            # Any other implementation would drop the prefix keyword silently and serve the bare base model.
            raise RuntimeError(f"the base model's attention implementation was changed to {current!r} while this "
                               f"AdapterBank is open; it needs {ATTN_IMPLEMENTATION!r} (was another bank on the same "
                               "model closed?)")

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
                keys, values = (torch.stack(t) for t in prefix_key_values(loaded, self.geometry))
            else:
                keys, values = self._virtual_token_key_values(loaded.embeddings)
            P = keys.shape[2]
            slot = self._allocate(P)
            self._kv[0, :, slot, :, :P] = keys.to(self.device, self.dtype)
            self._kv[1, :, slot, :, :P] = values.to(self.device, self.dtype)
            self._lengths[slot] = P
        self._lengths_host[slot] = P
        self._slot_by_name[name] = slot

    def remove(self, name):
        """Remove adapter ``name`` (``KeyError`` if absent); its table entry is zeroed and reused by later adds."""
        self._check_open(runs_model=False)
        if name not in self._slot_by_name:
            raise KeyError(f"no adapter named {name!r} in the bank (it holds {sorted(self._slot_by_name)})")
        slot = self._slot_by_name.pop(name)
        with torch.inference_mode():
            self._kv[:, :, slot].zero_()
            self._lengths[slot] = 0
        self._lengths_host[slot] = 0
        self._free_slots.add(slot)

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
        return self._lengths_host[self.slot_of(name)]

    @property
    def capacity(self):
        """How many adapters fit before the tables grow."""
        return 0 if self._closed else self._kv.shape[2] - 1

    @property
    def storage_bytes(self):
        """Bytes held by the prefix tables (keys, values and lengths)."""
        if self._closed:
            return 0
        return self._kv.numel() * self._kv.element_size() + self._lengths.numel() * self._lengths.element_size()

    def _allocate(self, num_virtual_tokens):
        """A free table entry, after growing the tables (T by doubling, P_max to fit) when needed."""
        _, _, T, _, P_max, _ = self._kv.shape
        new_T = T if self._free_slots else 2 * T
        new_P = max(P_max, num_virtual_tokens)
        if (new_T, new_P) != (T, P_max):
            grown = self._kv.new_zeros(*self._kv.shape[:2], new_T, self._kv.shape[3], new_P, self._kv.shape[5])
            grown[:, :, :T, :, :P_max] = self._kv
            self._kv = grown
            lengths = self._lengths.new_zeros(new_T)
            lengths[:T] = self._lengths
            self._lengths = lengths
            self._lengths_host += [0] * (new_T - T)
            self._free_slots.update(range(T, new_T))
            self._refresh_layer_views()
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        return slot

    def _refresh_layer_views(self):
        self._layer_keys = tuple(self._kv[0].unbind(0))
        self._layer_values = tuple(self._kv[1].unbind(0))

    def _virtual_token_key_values(self, embeddings):
        """Run P virtual-token embeddings ``[P, hidden]`` through the frozen model at positions ``0 .. P-1`` (what
        PEFT's concatenation gives them) and return their per-layer keys and values, each ``[NL, Hkv, P, D]``."""
        from transformers import DynamicCache

        P = embeddings.shape[0]
        inputs_embeds = embeddings.to(self.device, self.dtype).unsqueeze(0)
        cache = DynamicCache(config=self.model.config)
        extra = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        no_prefix = self._prefix_spec(torch.full((1,), NO_ADAPTER_SLOT, dtype=torch.int32, device=self.device))
        self.model(inputs_embeds=inputs_embeds, attention_mask=torch.ones(1, P, dtype=torch.long, device=self.device),
                   position_ids=torch.arange(P, device=self.device).unsqueeze(0), use_cache=True,
                   **compat.cache_kwargs(self.model, cache), **{PREFIX_KWARG: no_prefix}, **extra)
        no_prefix.check_consumed(type(self.model).__name__, "the bank's (empty) prefix")
        layers = [compat.cache_layer_key_values(cache, i) for i in range(self.geometry.num_layers)]
        return torch.stack([keys[0] for keys, _ in layers]), torch.stack([values[0] for _, values in layers])

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
        prefix_index, offsets = self._route(adapters, input_ids.shape[0])
        with torch.inference_mode():
            spec = self._prefix_spec(prefix_index)
            logits = self._forward(input_ids, attention_mask, _positions(attention_mask, offsets), spec)
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
            self._sampling_settings(generate_kwargs.get("temperature"), generate_kwargs.get("top_k"),
                                    generate_kwargs.get("top_p"))
        empty_rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"attention_mask: rows {empty_rows} have no real token to continue from")
        prefix_index, offsets = self._route(adapters, input_ids.shape[0])
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
        specs = {}  # by the number of rows per input row (beams, return sequences): the prefix index repeated
        steps = GenerationStepChecks(type(self.model).__name__, "the adapters' prefixes")

        def add_prefixes(model_inputs):
            # transformers numbers positions pad-aware, cumsum(mask) - 1, as the bank does; a row's adapter adds P.
            position_ids = model_inputs.get("position_ids")
            if position_ids is None:
                raise ValueError(f"{type(self.model).__name__}.generate passed no position_ids; the bank needs them "
                                 "to place each row's tokens after its adapter's virtual tokens")
            copies = position_ids.shape[0] // B
            if copies not in specs:
                specs[copies] = (self._prefix_spec(prefix_index.repeat_interleave(copies)),
                                 offsets.repeat_interleave(copies).unsqueeze(1))
            spec, row_offsets = specs[copies]
            model_inputs["position_ids"] = position_ids + row_offsets
            model_inputs[PREFIX_KWARG] = steps.next(spec)
            return model_inputs

        # transformers continues every row from its last column: move right padding (or any pad not at the left) to
        # the left, keeping the real tokens' order, and put the caller's layout back in front of the new tokens.
        left_aligned = bool(attention_mask[:, -1].all())
        if left_aligned:
            ids, mask = input_ids, attention_mask
        else:
            order = torch.argsort(attention_mask, dim=1, stable=True)
            ids, mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        with torch.inference_mode(), _drawing_from(generator), compat.generation_step_hook(self.model, add_prefixes):
            out = self.model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
        steps.finish()
        if left_aligned:
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        copies = sequences.shape[0] // B
        sequences = torch.cat([input_ids.repeat_interleave(copies, 0), sequences[:, input_ids.shape[1]:]], 1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out

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

    def _route(self, adapters, batch_size):
        """``prefix_index [B]`` int32 and the position offsets ``[B]`` (each row's number of virtual tokens)."""
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
        slots = [NO_ADAPTER_SLOT if a is None else self._slot_by_name[a] for a in adapters]
        offsets = [self._lengths_host[s] for s in slots]
        return (torch.tensor(slots, dtype=torch.int32, device=self.device),
                torch.tensor(offsets, dtype=torch.long, device=self.device))

    def _prefix_spec(self, prefix_index):
        """The bank's tables as a ``PrefixSpec`` for the rows' table entries ``prefix_index [B]``. Built without
        the spec's value checks (device syncs on every forward and decode step): ``_route`` makes every index a
        live slot and ``_lengths`` never exceeds ``P_max``, by construction."""
        return PrefixSpec.build(self._layer_keys, self._layer_values, prefix_index, self._lengths,
                                check_values=False)

    def _forward(self, input_ids, attention_mask, position_ids, spec, cache=None, logits_to_keep=0):
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep and self._accepts_logits_to_keep else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=cache is not None, **compat.cache_kwargs(self.model, cache),
                         **{PREFIX_KWARG: spec}, **extra)
        spec.check_consumed(type(self.model).__name__, "the adapters' prefixes")
        return out.logits

    def _sampling_settings(self, temperature, top_k, top_p):
        """Sampling arguments with None resolved like transformers: generation config, then its global defaults."""
        generation_config = getattr(self.model, "generation_config", None)
        resolved = []
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
            if value is None:
                value = getattr(generation_config, name, None)
            resolved.append(SAMPLING_DEFAULTS[name] if value is None else value)
        _check_sampling(*resolved)
        return resolved


def _positions(attention_mask, offsets):
    """Position ids ``[B, L]``: real tokens at ``offset + cumsum(mask) - 1``; padding at 0 (its keys are masked and
    its outputs unused, it only needs a valid position)."""
    positions = offsets.unsqueeze(1) + attention_mask.cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def _check_sampling(temperature, top_k, top_p):
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number when sampling, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


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
