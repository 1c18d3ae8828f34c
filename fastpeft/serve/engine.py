"""Continuous batching over ``fastpeft.AdapterBank``: requests join and leave the running batch at token boundaries,
each row with its own adapter, through fastpeft's prefix attention.

The KV cache (``SlotCache``). One tensor per layer for keys and one for values, ``[max_batch, Hkv, max_len, D]``,
allocated once: a request owns one slot (row) from admission to its end. Its tokens sit left-aligned at
``0 .. length-1``; everything after is stale and masked. The cache holds only the request's own tokens: its adapter's
prefix is read from the bank's tables through ``prefix_index`` at every step (never copied into the cache), so two
tenants sending the same prompt share nothing but the frozen weights.

A step. (1) Requests waiting in the queue take free slots and are prefilled together in one forward (right-padded,
positions from the mask, as ``AdapterBank.__call__``); each row's real K/V are copied into its slot and its first
token picked from its last real position. (2) One decode forward feeds every running row its last token. Running rows occupy slots
``0 .. B-1`` (admission takes the lowest free slot; a row is moved down once when a slot below it frees up), so the
step's cache is the storage's first B rows cut to the longest length ``S`` + 1, as views
(``compat.in_place_decode_cache``): each layer writes row b's new key/value in place at column ``length_b`` of its
slot, and nothing is gathered or copied per step. The attention mask is ``[B, S + 1]``: ``1`` for a row's
``length + 1`` keys (its cached ones and the new one), ``0`` for the stale columns after them; positions are
``P + length`` (PEFT's numbering: the virtual tokens first). The fused attention then sees, per row, exactly its
prefix, its own keys and the new key: one query under bottom-right causal alignment sees every unmasked key. (3) Rows that produced an end-of-sequence token, reached ``max_tokens``, were cancelled
(their client went away) or whose adapter was removed leave; their slot is free for the next step.

Thread model. One engine thread owns the bank and the model: adding and removing adapters are commands it runs
between steps (so no running row ever reads a table entry that was freed and reused). HTTP handler threads only
submit requests (a bounded queue: ``QueueFull`` when it is full) and read each request's event queue.
"""

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..bank import NO_ADAPTER_SLOT
from ..prefix_tables import pad_aware_positions
from ..sampling import check_sampling, logits_processors


class QueueFull(Exception):
    """The engine's waiting queue is full (the server answers 429)."""


class AdapterRemoved(Exception):
    pass


@dataclass
class GenerationRequest:
    """One completion. ``adapter`` is a bank adapter name or None (the base model). Events arrive on ``events``:
    ``("token", id)`` per new token, then ``("done", finish_reason)`` (``"stop"``: end-of-sequence token; ``"length"``:
    max_tokens; ``"cancelled"``) or ``("error", message)``."""

    prompt_ids: list
    adapter: str = None
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = all tokens
    repetition_penalty: float = 1.0   # 1 = off
    seed: int = None
    ignore_eos: bool = False
    events: queue.Queue = field(default_factory=queue.Queue)
    generated: list = field(default_factory=list)
    finish_reason: str = None
    submitted_at: float = field(default_factory=time.monotonic)
    _cancelled: bool = False

    def cancel(self):
        """Ask the engine to drop this request at the next token boundary (its slot is freed then)."""
        self._cancelled = True

    @property
    def cancelled(self):
        return self._cancelled


class _Row:
    """A running request: its slot, cache length, table entry, position offset and the token not yet fed."""

    __slots__ = ("request", "slot", "length", "prefix_slot", "offset", "last_token", "generator", "processors")

    def __init__(self, request, slot, prefix_slot, offset, generator):
        self.request, self.slot, self.prefix_slot, self.offset = request, slot, prefix_slot, offset
        self.length, self.last_token, self.generator = 0, None, generator
        self.processors = logits_processors(bool(request.temperature), request.temperature, request.top_k,
                                             request.top_p, request.repetition_penalty)


class SlotCache:
    """Per-slot KV storage: keys and values ``[max_batch, Hkv, max_len, D]`` per layer, allocated once."""

    def __init__(self, num_layers, max_batch, num_kv_heads, max_len, head_dim, device, dtype):
        shape = (max_batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class Engine:
    """Continuous batching of ``GenerationRequest`` s over an open ``AdapterBank``.

    Arguments:
        bank: the ``AdapterBank`` (the engine thread becomes its only user once ``start`` ran).
        max_batch: the most requests decoding together (slots).
        max_len: the most tokens (prompt + generated) a request may hold in its slot.
        max_queue: the most requests waiting for a slot; ``submit`` raises ``QueueFull`` beyond.
        eos_token_ids: ids that end a request (``finish_reason="stop"``); default the model's generation config.
    """

    def __init__(self, bank, max_batch=16, max_len=512, max_queue=64, eos_token_ids=None):
        if max_batch < 1 or max_len < 2 or max_queue < 0:
            raise ValueError(f"need max_batch >= 1, max_len >= 2, max_queue >= 0; got {max_batch}, {max_len}, "
                             f"{max_queue}")
        self.bank = bank
        g = bank.geometry
        self.cache = SlotCache(g.num_layers, max_batch, g.num_kv_heads, max_len, g.head_dim, bank.device, bank.dtype)
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        if eos_token_ids is None:
            eos = getattr(getattr(bank.model, "generation_config", None), "eos_token_id", None)
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = set(eos_token_ids)
        self._waiting = deque()
        self._commands = deque()
        self._rows = []
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._lock = threading.Condition()
        self._paused = False
        self._stop = False
        self._thread = None
        self._adapter_names = tuple(bank.names)
        self.stats = {"steps": 0, "prefills": 0, "max_rows": 0, "tokens": 0, "finished": 0, "cancelled": 0,
                      "slot_moves": 0}

    # ----- control ---------------------------------------------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="fastpeft-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=10):
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self):
        """Admit no new request until ``resume`` (running rows go on). For maintenance and tests."""
        with self._lock:
            self._paused = True

    def resume(self):
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    @property
    def running(self):
        return len(self._rows)

    @property
    def waiting(self):
        return len(self._waiting)

    def submit(self, request):
        """Queue ``request``; raises ``QueueFull`` when ``max_queue`` requests already wait beyond the free slots,
        ``ValueError`` when it cannot fit its slot (prompt + max_tokens > max_len) or holds no token."""
        if not request.prompt_ids:
            raise ValueError("the prompt holds no token")
        if len(request.prompt_ids) + request.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                             f"the server's context of {self.max_len} tokens")
        if request.temperature:
            check_sampling(request.temperature, request.top_k, request.top_p)
        if not request.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {request.repetition_penalty!r}")
        with self._lock:
            # Up to max_queue requests wait beyond those the free slots take at the next step.
            if len(self._waiting) >= self.max_queue + len(self._free_slots):
                raise QueueFull(f"{len(self._waiting)} requests are waiting for {len(self._free_slots)} free slots "
                                f"(at most {self.max_queue} may wait beyond the free slots)")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def call(self, function, timeout=120):
        """Run ``function(bank)`` on the engine thread between two steps and return its result (or raise its
        exception): how adapters are added and removed while serving."""
        done = queue.Queue(maxsize=1)
        with self._lock:
            self._commands.append((function, done))
            self._lock.notify_all()
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def adapter_names(self):
        """The bank's adapters, in the order they were added (a snapshot the engine thread refreshes after each
        command; safe to read from any thread)."""
        return list(self._adapter_names)

    def remove_adapter(self, name):
        """Remove adapter ``name`` between steps; its running and waiting requests end with an error first."""

        def remove(bank):
            if name not in bank:
                raise KeyError(name)
            for row in [r for r in self._rows if r.request.adapter == name]:
                self._finish(row, error=f"adapter {name!r} was removed")
            with self._lock:
                dropped = [r for r in self._waiting if r.adapter == name]
                for request in dropped:
                    self._waiting.remove(request)
            for request in dropped:
                request.events.put(("error", f"adapter {name!r} was removed"))
            bank.remove(name)

        self.call(remove)

    def add_adapter(self, name, source):
        self.call(lambda bank: bank.add(name, source))

    # ----- the loop --------------------------------------------------------------------------------------------

    def _loop(self):
        while True:
            with self._lock:
                while not self._stop and not self._commands and not self._rows and (
                        self._paused or not self._waiting):
                    self._lock.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for function, done in commands:
                try:
                    result = function(self.bank)
                except Exception as exc:  # handed to the caller
                    result, exc_info = None, exc
                else:
                    exc_info = None
                self._adapter_names = tuple(self.bank.names)
                done.put((True, result) if exc_info is None else (False, exc_info))
            try:
                self._step()
            except Exception as exc:  # a failing step must not leave requests waiting forever
                for row in list(self._rows):
                    self._finish(row, error=f"internal error: {exc}")
        for row in list(self._rows):
            self._finish(row, error="the server is shutting down")
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            request.events.put(("error", "the server is shutting down"))

    def _step(self):
        for row in [r for r in self._rows if r.request.cancelled]:
            self._finish(row, reason="cancelled")
        joining = []
        with self._lock:
            while self._waiting and len(joining) < len(self._free_slots) and not self._paused:
                request = self._waiting.popleft()
                if request.cancelled:
                    request.finish_reason = "cancelled"
                    self.stats["cancelled"] += 1
                    request.events.put(("done", "cancelled"))
                    continue
                joining.append(request)
        if joining:
            self._prefill(joining)
        if self._rows:
            self._decode()
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _admit(self, request):
        """A ``_Row`` for ``request`` in a free slot, or None after ending it (its adapter is gone)."""
        bank = self.bank
        if request.adapter is None:
            prefix_slot, offset = NO_ADAPTER_SLOT, 0
        elif request.adapter in bank:
            prefix_slot, offset = bank.slot_of(request.adapter), bank.num_virtual_tokens(request.adapter)
        else:
            request.events.put(("error", f"adapter {request.adapter!r} is not loaded"))
            return None
        generator = None
        if request.temperature and request.seed is not None:
            generator = torch.Generator(bank.device).manual_seed(int(request.seed))
        with self._lock:
            slot = min(self._free_slots)  # the lowest: running rows stay packed at the front (_compact_slots)
            self._free_slots.remove(slot)
        return _Row(request, slot, prefix_slot, offset, generator)

    def _prefill(self, requests):
        bank = self.bank
        rows = [row for row in map(self._admit, requests) if row is not None]
        if not rows:
            return
        self._rows.extend(rows)  # from here on, a failing step ends them (and frees their slots)
        device = bank.device
        lengths = [len(row.request.prompt_ids) for row in rows]
        width = max(lengths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :lengths[b]] = torch.tensor(row.request.prompt_ids)
            mask[b, :lengths[b]] = 1
        ids, mask = ids.to(device), mask.to(device)
        prefix_index = torch.tensor([row.prefix_slot for row in rows], dtype=torch.int32, device=device)
        offsets = torch.tensor([row.offset for row in rows], dtype=torch.long, device=device)
        from transformers import DynamicCache

        from ..integration import compat

        with torch.inference_mode():
            cache = DynamicCache(config=bank.model.config)
            logits = bank.forward(ids, mask, pad_aware_positions(mask, offsets), prefix_index, cache)
            last = torch.tensor(lengths, device=device) - 1
            next_logits = logits[torch.arange(len(rows), device=device), last]
            for layer in range(len(self.cache.keys)):
                keys, values = compat.cache_layer_key_values(cache, layer)
                for b, row in enumerate(rows):
                    self.cache.keys[layer][row.slot, :, :lengths[b]] = keys[b, :, :lengths[b]]
                    self.cache.values[layer][row.slot, :, :lengths[b]] = values[b, :, :lengths[b]]
        for b, row in enumerate(rows):
            row.length = lengths[b]
        self.stats["prefills"] += 1
        self._emit(rows, next_logits)

    def _compact_slots(self):
        """Move rows into slots ``0 .. n-1`` (n running rows), so that a decode step reads the slot storage's first n
        rows as views. A row moves only when one below n freed up while it ran (admission takes the lowest free
        slot): one copy of its cached tokens, not one per step. The vacated slot is zeroed like a finished one."""
        n = len(self._rows)
        with self._lock:
            holes = sorted(slot for slot in self._free_slots if slot < n)
        movers = [row for row in self._rows if row.slot >= n]
        for row, target in zip(movers, holes):
            for keys, values in zip(self.cache.keys, self.cache.values):
                keys[target, :, :row.length] = keys[row.slot, :, :row.length]
                values[target, :, :row.length] = values[row.slot, :, :row.length]
                keys[row.slot, :, :row.length].zero_()
                values[row.slot, :, :row.length].zero_()
            with self._lock:
                self._free_slots.remove(target)
                self._free_slots.append(row.slot)
            row.slot = target
            self.stats["slot_moves"] += 1

    def _decode(self):
        from ..integration import compat

        self._compact_slots()
        bank = self.bank
        rows = sorted(self._rows, key=lambda row: row.slot)  # slot b holds batch row b
        device = bank.device
        B = len(rows)
        lengths = torch.tensor([row.length for row in rows], device=device)
        S = max(row.length for row in rows)
        with torch.inference_mode():
            # The new key of row b lands at column lengths[b] of its slot, in place; columns past it are stale.
            cache = compat.in_place_decode_cache([keys[:B] for keys in self.cache.keys],
                                                 [values[:B] for values in self.cache.values], lengths, S)
            mask = (torch.arange(S + 1, device=device) <= lengths.unsqueeze(1)).long()
            ids = torch.tensor([[row.last_token] for row in rows], device=device)
            positions = (torch.tensor([row.offset for row in rows], device=device) + lengths).unsqueeze(1)
            prefix_index = torch.tensor([row.prefix_slot for row in rows], dtype=torch.int32, device=device)
            logits = bank.forward(ids, mask, positions, prefix_index, cache, logits_to_keep=1)
        for row in rows:
            row.length += 1
        self.stats["steps"] += 1
        self._emit(rows, logits[:, -1])

    def _emit(self, rows, logits):
        """Pick each row's next token from ``logits [B, vocab]``, hand it to the client, end finished rows."""
        greedy = logits.float().argmax(-1).tolist()
        for b, row in enumerate(rows):
            request = row.request
            if request.temperature or row.processors:
                ids = torch.tensor([request.prompt_ids + request.generated], device=logits.device)
                scores = row.processors(ids, logits[b:b + 1].float())
                if request.temperature:
                    token = int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator)[0, 0])
                else:
                    token = int(scores.argmax(-1)[0])
            else:
                token = greedy[b]
            self.stats["tokens"] += 1
            if token in self.eos_token_ids and not request.ignore_eos:
                self._finish(row, reason="stop")
                continue
            request.generated.append(token)
            request.events.put(("token", token))
            row.last_token = token
            if len(request.generated) >= request.max_tokens:
                self._finish(row, reason="length")

    def _finish(self, row, reason=None, error=None):
        if row in self._rows:
            self._rows.remove(row)
        # Masked keys are never attended to; zeroing the slot anyway means no later occupant's step even loads
        # this tenant's K/V.
        for keys, values in zip(self.cache.keys, self.cache.values):
            keys[row.slot, :, :row.length].zero_()
            values[row.slot, :, :row.length].zero_()
        with self._lock:
            self._free_slots.append(row.slot)
        request = row.request
        if error is not None:
            request.events.put(("error", error))
            return
        request.finish_reason = reason
        self.stats["finished"] += 1
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        request.events.put(("done", reason))

