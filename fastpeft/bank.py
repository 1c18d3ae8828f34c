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

Generation. The per-request cache (a transformers ``DynamicCache``) holds only the request's own tokens; every step
reads the prefixes from the bank through ``prefix_index`` (for L == 1 the dispatcher picks the split-KV decode
kernels). Finished rows are padded with the pad id, as transformers' ``generate`` does.
"""

import inspect
from dataclasses import dataclass

import torch

from .adapters import PREFIX_TUNING, BaseGeometry, check_compatible, load_prompt_adapter, prefix_key_values
from .integration import compat
from .integration.attention import (ATTN_IMPLEMENTATION, PREFIX_KWARG, PrefixSpec, check_supported_model,
                                    use_fastpeft_attention)

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
        self.model.set_attn_implementation(self._previous_attn_implementation)
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

    def generate(self, input_ids, attention_mask=None, adapters=None, max_new_tokens=20, do_sample=False,
                 temperature=None, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, generator=None):
        """Generate for a batch whose rows use different adapters, like transformers' ``generate``.

        Arguments:
            input_ids, attention_mask, adapters: as in ``__call__``. Every row needs at least one real token.
            max_new_tokens: the most tokens to add per row.
            do_sample: False = greedy; True = sample from the softmax of the logits after ``temperature``,
                ``top_k`` (keep the k most likely tokens; 0 = all) and ``top_p`` (keep the smallest set of most
                likely tokens whose probability reaches top_p), applied in that order as transformers does. Each
                left at None takes the model's generation config value, else transformers' default (temperature
                1.0, top_k 50, top_p 1.0), so sampling draws from the distribution ``model.generate`` draws from.
            eos_token_id: an id or a list of ids that end a row; default the model's generation config; an empty
                list: rows never end early.
            pad_token_id: what fills a row after it ended; default the generation config's pad id, else its
                first eos id.
            generator: a ``torch.Generator`` for sampling; None = torch's global generator (as transformers).

        Returns ``[B, L + n]`` token ids (the input followed by the new tokens), ``n <= max_new_tokens``: it stops
        early once every row has produced an eos token. Greedy tokens of each row equal those of PEFT's forward looped
        over that row alone, unpadded (``fastpeft.integration.reference_generate``).
        """
        self._check_open()
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if do_sample:
            temperature, top_k, top_p = self._sampling_settings(temperature, top_k, top_p)
        empty_rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"attention_mask: rows {empty_rows} have no real token to continue from")
        prefix_index, offsets = self._route(adapters, input_ids.shape[0])
        eos_ids, pad_id = self._stop_ids(eos_token_id, pad_token_id)
        if max_new_tokens == 0:
            return input_ids.clone()

        from transformers import DynamicCache

        B = input_ids.shape[0]
        with torch.inference_mode():
            spec = self._prefix_spec(prefix_index)
            cache = DynamicCache(config=self.model.config)
            # With left padding (or none) every row's last input token is real: only its logits are needed.
            ends_real = bool(attention_mask[:, -1].all())
            logits = self._forward(input_ids, attention_mask, _positions(attention_mask, offsets), spec, cache,
                                   logits_to_keep=1 if ends_real else 0)
            if ends_real:
                next_logits = logits[:, -1]
            else:
                last_real = (attention_mask * torch.arange(input_ids.shape[1], device=self.device)).argmax(-1)
                next_logits = logits[torch.arange(B, device=self.device), last_real]
            next_position = offsets + attention_mask.sum(-1)
            unfinished = torch.ones(B, dtype=torch.bool, device=self.device)
            new_tokens = []
            for step in range(max_new_tokens):
                token = _pick_tokens(next_logits, do_sample, temperature, top_k, top_p, generator)
                if eos_ids is not None:
                    token = torch.where(unfinished, token, pad_id)
                    unfinished &= ~torch.isin(token, eos_ids)
                new_tokens.append(token)
                if step == max_new_tokens - 1 or (eos_ids is not None and not bool(unfinished.any())):
                    break
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
                next_logits = self._forward(token.unsqueeze(1), attention_mask, next_position.unsqueeze(1), spec,
                                            cache, logits_to_keep=1)[:, -1]
                next_position = next_position + 1
            return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

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

    def _stop_ids(self, eos_token_id, pad_token_id):
        """(eos ids as a tensor or None, pad id) from the arguments or the model's generation config."""
        generation_config = getattr(self.model, "generation_config", None)
        if eos_token_id is None and generation_config is not None:
            eos_token_id = generation_config.eos_token_id
        if eos_token_id is None:
            return None, None
        eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not all(isinstance(t, int) for t in eos_list):
            raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
        if not eos_list:
            return None, None
        if pad_token_id is None and generation_config is not None:
            pad_token_id = generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = getattr(self.model.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos_list[0]
        return torch.tensor(eos_list, device=self.device), torch.tensor(int(pad_token_id), device=self.device)


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


def _pick_tokens(logits, do_sample, temperature, top_k, top_p, generator):
    """Next token per row from ``logits [B, vocab]``: argmax, or a sample after temperature, top-k and top-p."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1)
        # Drop the least likely tokens whose cumulative probability stays within 1 - top_p; keep the best always.
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[:, -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
