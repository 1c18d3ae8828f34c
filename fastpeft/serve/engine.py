"""Continuous batching over ``fastpeft.AdapterBank``: requests join and leave the running batch at token boundaries,
each row with its own adapter, through fastpeft's prefix attention.

The KV cache (``SlotCache``). One tensor per layer for keys and one for values, ``[max_batch, Hkv, max_len, D]``,
allocated once: a request owns one slot (row) from admission to its end. Its tokens sit left-aligned at
``0 .. length-1``; everything after is stale and masked. The cache holds only the request's own tokens: its adapter's
prefix is read from the bank's tables through ``prefix_index`` at every step (never copied into the cache), so two
tenants sending the same prompt share nothing but the frozen weights.

A step. (1) Requests waiting in the queue take free slots and are prefilled together in one forward (right-padded,
positions from the mask, as ``AdapterBank.__call__``); each row's real K/V are copied into its slot and its first
token picked from its last real position. The ``n`` continuations of one prompt (``continuations``) are admitted
together and prefilled once: the prompt's K/V are copied from its slot into the others' slots (``_share_prompt``),
and every continuation picks its first token from the same logits. (2) One decode forward feeds every running row its last token. Running rows occupy slots
``0 .. B-1`` (admission takes the lowest free slot; a row is moved down once when a slot below it frees up), so the
step's cache is the storage's first B rows cut to the longest length ``S`` + 1, as views
(``compat.in_place_decode_cache``): each layer writes row b's new key/value in place at column ``length_b`` of its
slot, and nothing is gathered or copied per step. The attention mask is ``[B, S + 1]``: ``1`` for a row's
``length + 1`` keys (its cached ones and the new one), ``0`` for the stale columns after them; positions are
``P + length`` (PEFT's numbering: the virtual tokens first). The fused attention then sees, per row, exactly its
prefix, its own keys and the new key: one query under bottom-right causal alignment sees every unmasked key. (3) Rows that produced an end-of-sequence token, reached ``max_tokens``, were cancelled
(their client went away) or whose adapter was removed leave; their slot is free for the next step.

Log-probabilities. A request that asks (``logprobs``, ``prompt_logprobs``) gets, beside its tokens, their
log-probabilities under the model and the most likely alternatives: ``log_softmax`` in float32 of the model's raw
logits (its adapter's, as PEFT's forward gives them), before repetition penalty, temperature, top-k or top-p. That is
what OpenAI's API and vLLM (its default ``raw_logprobs``) report and what lm-evaluation-harness sums as a
log-likelihood: the model's distribution, independent of how a token was then picked; the warped one would change
with the sampling settings and give ``-inf`` to every token outside top-k/top-p. Prompt log-probabilities come from
the prefill's logits (position ``i`` scores prompt token ``i + 1``; the first token has none).

Thread model. One engine thread owns the bank and the model: adding and removing adapters are commands it runs
between steps (so no running row ever reads a table entry that was freed and reused). HTTP handler threads only
submit requests (a bounded queue: ``QueueFull`` when it is full) and read each request's event queue.
"""

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from ..bank import NO_ADAPTER_SLOT
from ..prefix_tables import pad_aware_positions
from ..sampling import check_sampling, logits_processors


MAX_LOGPROBS = 20
"""The most alternatives per position a request may ask for (vLLM's default limit; OpenAI's legacy API allows 5)."""

SEED_RANGE = (-(1 << 63), 1 << 64)
"""Seeds ``torch.Generator.manual_seed`` takes: ``SEED_RANGE[0] <= seed < SEED_RANGE[1]``."""


class QueueFull(Exception):
    """The engine's waiting queue is full (the server answers 429)."""


@dataclass(frozen=True)
class RequestFailed:
    """Why the engine ended a request with an error, carried by its ``("error", RequestFailed)`` event. ``reason``:
    ``"adapter_removed"`` (its adapter was removed while it waited or ran), ``"adapter_not_loaded"`` (the bank has
    no such adapter when the request's turn comes), ``"shutting_down"`` or ``"internal"`` (a step failed). A front
    end answers from it rather than from the engine's adapter list, which may not have caught up yet."""

    reason: str
    message: str

    def __str__(self):
        return self.message


@dataclass(frozen=True)
class KVUsage:
    """How much of the engine's KV storage running requests hold (``Engine.kv_usage``): ``blocks_in_use`` of
    ``blocks_total`` blocks of ``block_tokens`` token positions each, and the bytes those blocks take. For the slot
    cache a block is one slot (``max_len`` positions), held by one request from admission to its end."""

    blocks_in_use: int
    blocks_total: int
    block_tokens: int
    bytes_in_use: int
    bytes_total: int


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probabilities at one position: ``token``'s ``logprob`` (the token picked, or the prompt's token) and
    ``top``, the most likely tokens as ``(id, logprob)`` pairs, most likely first (as many as the request asked for).
    Log-probabilities of the model's raw logits, in float32 (see the module's docstring)."""

    token: int
    logprob: float
    top: tuple = ()


@dataclass
class GenerationRequest:
    """One completion. ``adapter`` is a bank adapter name or None (the base model). ``max_tokens`` 0: prefill only
    (the prompt's log-probabilities, no token). Events arrive on ``events`` (anything with ``put``; a ``queue.Queue``
    by default): ``("token", id)`` per new token, then ``("done", finish_reason)`` (``"stop"``: end-of-sequence token;
    ``"length"``: max_tokens; ``"cancelled"``) or ``("error", RequestFailed)``.

    Log-probabilities are opt-in, as extra events among those: ``logprobs=k`` (0 .. ``MAX_LOGPROBS``) puts
    ``("logprobs", TokenLogprob)`` right before each ``("token", id)`` (the token's log-probability and the ``k``
    most likely alternatives), and before ``("done", "stop")`` for the end-of-sequence token that ended the request
    (which gets no ``"token"`` event: it is not part of the text; vLLM reports its log-probability too);
    ``prompt_logprobs=k`` puts ``("prompt_logprobs", [None, TokenLogprob, ...])`` before any other event: one entry
    per prompt token, None for the first (nothing precedes it)."""

    prompt_ids: list
    adapter: str = None
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = all tokens
    repetition_penalty: float = 1.0   # 1 = off
    seed: int = None
    ignore_eos: bool = False
    logprobs: int = None              # None = off
    prompt_logprobs: int = None       # None = off
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


def continuations(request, n):
    """``n`` requests continuing ``request``'s prompt: ``request`` itself, then copies of it with their own ``events``
    queues. Submit them together (``Engine.submit`` of the list): the prompt is prefilled once and every continuation
    decodes from a copy of its K/V. With a ``seed``, continuation ``i`` samples from a generator seeded with
    ``seed + i`` (vLLM's rule for ``n > 1``): a seeded request repeats itself, and its first continuation is what the
    request alone gives."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    copies = [replace(request, seed=None if request.seed is None else request.seed + i, events=queue.Queue(),
                      generated=[], finish_reason=None, _cancelled=False) for i in range(1, n)]
    return [request] + copies


def _token_logprobs(logits, tokens, top_counts):
    """``TokenLogprob`` of ``tokens[i]`` under ``logits[i]`` (``[N, vocab]``, the model's raw logits) with its
    ``top_counts[i]`` most likely tokens: float32 ``log_softmax``, one top-k for all rows."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    k = max(top_counts)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(token, logprob, tuple(zip(ids[:count], values[:count])))
            for token, logprob, ids, values, count in zip(tokens, chosen, top_ids, top_values, top_counts)]


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
        self.stats = {"steps": 0, "prefills": 0, "prefill_tokens": 0, "max_rows": 0, "tokens": 0, "finished": 0,
                      "cancelled": 0, "slot_moves": 0}

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

    def kv_usage(self):
        """A ``KVUsage`` snapshot of the KV storage held by running requests (safe to read from any thread)."""
        with self._lock:
            in_use = self.max_batch - len(self._free_slots)
        slot_bytes = self.cache.nbytes // self.max_batch
        return KVUsage(blocks_in_use=in_use, blocks_total=self.max_batch, block_tokens=self.max_len,
                       bytes_in_use=in_use * slot_bytes, bytes_total=self.cache.nbytes)

    @property
    def waiting(self):
        """Requests waiting for a slot (each continuation of a prompt counts)."""
        with self._lock:
            return sum(len(group) for group in self._waiting)

    def submit(self, request):
        """Queue ``request``, or a list of requests continuing one prompt (``continuations``: same ``prompt_ids`` and
        ``adapter``), admitted together when enough slots are free and prefilled once. Raises ``QueueFull`` when
        the requests would wait beyond ``max_queue`` requests past the free slots, ``ValueError`` when one cannot fit
        its slot (prompt + max_tokens > max_len), holds no token or has a setting out of range, or when a group does
        not share its prompt or needs more than ``max_batch`` slots. Returns ``request``."""
        group = list(request) if isinstance(request, (list, tuple)) else [request]
        if not group:
            raise ValueError("no request to submit (an empty list)")
        for member in group:
            self._check(member)
        first = group[0]
        if any(member.prompt_ids != first.prompt_ids or member.adapter != first.adapter for member in group[1:]):
            raise ValueError("the continuations of one prompt must share their prompt_ids and adapter")
        if len(group) > self.max_batch:
            raise ValueError(f"n={len(group)} continuations of one prompt need more slots than the server's "
                             f"max_batch of {self.max_batch}")
        with self._lock:
            # Up to max_queue requests wait beyond those the free slots take at the next step.
            waiting = sum(len(queued) for queued in self._waiting)
            if waiting + len(group) > self.max_queue + len(self._free_slots):
                raise QueueFull(f"{waiting} requests are waiting for {len(self._free_slots)} free slots "
                                f"(at most {self.max_queue} may wait beyond the free slots)")
            self._waiting.append(group)
            self._lock.notify_all()
        return request

    def _check(self, request):
        """Raise ValueError naming the first setting of ``request`` the engine cannot run."""
        if not request.prompt_ids:
            raise ValueError("the prompt holds no token")
        if isinstance(request.max_tokens, bool) or not isinstance(request.max_tokens, int) or request.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {request.max_tokens!r}")
        if len(request.prompt_ids) + request.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                             f"the server's context of {self.max_len} tokens")
        if request.temperature:
            check_sampling(request.temperature, request.top_k, request.top_p)
        if not request.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {request.repetition_penalty!r}")
        if request.seed is not None and (isinstance(request.seed, bool) or not isinstance(request.seed, int)
                                         or not SEED_RANGE[0] <= request.seed < SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}), got {request.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(request, name)
            if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                      or not 0 <= count <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {count!r}")

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
            failure = RequestFailed("adapter_removed", f"adapter {name!r} was removed")
            for row in [r for r in self._rows if r.request.adapter == name]:
                self._finish(row, error=failure)
            with self._lock:
                dropped = [group for group in self._waiting if group[0].adapter == name]
                for group in dropped:
                    self._waiting.remove(group)
            for request in [request for group in dropped for request in group]:
                request.events.put(("error", failure))
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
                    self._finish(row, error=RequestFailed("internal", f"internal error: {exc}"))
        shutting_down = RequestFailed("shutting_down", "the server is shutting down")
        for row in list(self._rows):
            self._finish(row, error=shutting_down)
        with self._lock:
            waiting, self._waiting = [request for group in self._waiting for request in group], deque()
        for request in waiting:
            request.events.put(("error", shutting_down))

    def _step(self):
        for row in [r for r in self._rows if r.request.cancelled]:
            self._finish(row, reason="cancelled")
        joining, taken = [], 0  # groups of continuations of one prompt; the slots they take
        with self._lock:
            while self._waiting and not self._paused:
                live = [request for request in self._waiting[0] if not request.cancelled]
                if taken + len(live) > len(self._free_slots):
                    break  # first come, first served: a group waits for its slots, later requests wait behind it
                for request in self._waiting.popleft():
                    if request.cancelled:
                        request.finish_reason = "cancelled"
                        self.stats["cancelled"] += 1
                        request.events.put(("done", "cancelled"))
                if live:
                    joining.append(live)
                    taken += len(live)
        if joining:
            self._prefill(joining)
        if self._rows:
            self._decode()
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _admit(self, group):
        """``_Row`` s in free slots for a group of continuations of one prompt, or [] after ending them (their
        adapter is gone)."""
        bank = self.bank
        adapter = group[0].adapter
        if adapter is None:
            prefix_slot, offset = NO_ADAPTER_SLOT, 0
        elif adapter in bank:
            prefix_slot, offset = bank.slot_of(adapter), bank.num_virtual_tokens(adapter)
        else:
            for request in group:
                request.events.put(("error", RequestFailed("adapter_not_loaded",
                                                           f"adapter {adapter!r} is not loaded")))
            return []
        rows = []
        for request in group:
            generator = None
            if request.temperature and request.seed is not None:
                generator = torch.Generator(bank.device).manual_seed(request.seed)
            with self._lock:
                slot = min(self._free_slots)  # the lowest: running rows stay packed at the front (_compact_slots)
                self._free_slots.remove(slot)
            rows.append(_Row(request, slot, prefix_slot, offset, generator))
        return rows

    def _prefill(self, groups):
        """Prefill one row per prompt (the first continuation of each group) in one forward, copy each prompt's
        K/V into its other continuations' slots, then pick every continuation's first token."""
        bank = self.bank
        groups = [rows for rows in map(self._admit, groups) if rows]
        if not groups:
            return
        for rows in groups:
            self._rows.extend(rows)  # from here on, a failing step ends them (and frees their slots)
        leaders = [rows[0] for rows in groups]
        device = bank.device
        lengths = [len(row.request.prompt_ids) for row in leaders]
        width = max(lengths)
        ids = torch.zeros(len(leaders), width, dtype=torch.long)
        mask = torch.zeros(len(leaders), width, dtype=torch.long)
        for b, row in enumerate(leaders):
            ids[b, :lengths[b]] = torch.tensor(row.request.prompt_ids)
            mask[b, :lengths[b]] = 1
        ids, mask = ids.to(device), mask.to(device)
        prefix_index = torch.tensor([row.prefix_slot for row in leaders], dtype=torch.int32, device=device)
        offsets = torch.tensor([row.offset for row in leaders], dtype=torch.long, device=device)
        from transformers import DynamicCache

        from ..integration import compat

        with torch.inference_mode():
            cache = DynamicCache(config=bank.model.config)
            logits = bank.forward(ids, mask, pad_aware_positions(mask, offsets), prefix_index, cache)
            last = torch.tensor(lengths, device=device) - 1
            next_logits = logits[torch.arange(len(leaders), device=device), last]
            for layer in range(len(self.cache.keys)):
                keys, values = compat.cache_layer_key_values(cache, layer)
                for b, row in enumerate(leaders):
                    self.cache.keys[layer][row.slot, :, :lengths[b]] = keys[b, :, :lengths[b]]
                    self.cache.values[layer][row.slot, :, :lengths[b]] = values[b, :, :lengths[b]]
            for b, rows in enumerate(groups):
                rows[0].length = lengths[b]
                self._share_prompt(rows[0], rows[1:])
                self._put_prompt_logprobs(rows, logits[b, :lengths[b] - 1])
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += sum(lengths)
        group_of_row = torch.tensor([b for b, rows in enumerate(groups) for _ in rows], device=device)
        self._emit([row for rows in groups for row in rows], next_logits[group_of_row])

    def _share_prompt(self, prefilled, rows):
        """Start ``rows`` (more continuations of ``prefilled``'s prompt) from copies of its prompt K/V. The slot cache
        keeps each row's tokens in its own slot, so sharing the prompt's K/V is one copy per continuation, never a
        forward; a block pool would let them reference the prompt's blocks instead."""
        if not rows:
            return
        slots = torch.tensor([row.slot for row in rows], device=self.bank.device)
        length = prefilled.length
        for keys, values in zip(self.cache.keys, self.cache.values):
            keys[slots, :, :length] = keys[prefilled.slot, :, :length]
            values[slots, :, :length] = values[prefilled.slot, :, :length]
        for row in rows:
            row.length = length

    @staticmethod
    def _put_prompt_logprobs(rows, logits):
        """``("prompt_logprobs", [None, TokenLogprob, ...])`` to each of ``rows`` (continuations of one prompt) that
        asked, from ``logits [L - 1, vocab]``: the prefill's logits at the prompt's positions but its last, position
        ``i`` scoring prompt token ``i + 1``."""
        counts = [row.request.prompt_logprobs for row in rows if row.request.prompt_logprobs is not None]
        if not counts:
            return
        prompt = rows[0].request.prompt_ids
        entries = _token_logprobs(logits, prompt[1:], [max(counts)] * (len(prompt) - 1)) if len(prompt) > 1 else []
        for row in rows:
            count = row.request.prompt_logprobs
            if count is not None:
                row.request.events.put(("prompt_logprobs", [None] + [
                    TokenLogprob(entry.token, entry.logprob, entry.top[:count]) for entry in entries]))

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
        """Pick each row's next token from ``logits [B, vocab]``, hand it (and its log-probabilities, when asked) to
        the client, end finished rows. A row with ``max_tokens`` 0 ends here without a token."""
        picking = [(b, row) for b, row in enumerate(rows) if row.request.max_tokens > 0]
        for b, row in enumerate(rows):
            if row.request.max_tokens == 0:
                self._finish(row, reason="length")
        if not picking:
            return
        greedy = logits.float().argmax(-1).tolist()
        tokens = []
        for b, row in picking:
            request = row.request
            if request.temperature or row.processors:
                ids = torch.tensor([request.prompt_ids + request.generated], device=logits.device)
                scores = row.processors(ids, logits[b:b + 1].float())
                if request.temperature:
                    tokens.append(int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator)[0, 0]))
                else:
                    tokens.append(int(scores.argmax(-1)[0]))
            else:
                tokens.append(greedy[b])
        # From the raw logits (not the processors' scores): the model's distribution, see the module's docstring.
        asking = [i for i, (_, row) in enumerate(picking) if row.request.logprobs is not None]
        logprobs = {}
        if asking:
            entries = _token_logprobs(logits[[picking[i][0] for i in asking]], [tokens[i] for i in asking],
                                      [picking[i][1].request.logprobs for i in asking])
            logprobs = dict(zip(asking, entries))
        for i, ((_, row), token) in enumerate(zip(picking, tokens)):
            request = row.request
            self.stats["tokens"] += 1
            if i in logprobs:
                request.events.put(("logprobs", logprobs[i]))
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

