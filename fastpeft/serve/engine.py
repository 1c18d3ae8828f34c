"""Continuous batching over ``fastpeft.AdapterBank``: requests join and leave the running batch at token boundaries,
each row with its own adapter, through fastpeft's prefix attention.

KV memory (``kv_pool.KVBlockPool``). One pool of fixed-size blocks (``block_size`` tokens of every layer's keys and
values), allocated once; a request holds the blocks its tokens fill, listed in its ``BlockTable``, and gives them
back when it ends. The pool holds only the requests' own tokens: an adapter's prefix K/V stays in the bank's prefix
tables, stored once and read through ``prefix_index`` at every step (never copied into a request's blocks), so two
tenants sending the same prompt share nothing but the frozen weights. The ``n`` continuations of one prompt
(``continuations``) share the prompt's blocks (``KVBlockPool.fork``: reference counts; a shared, partly filled last
block is copied when a continuation first writes into it).

Admission. A request is admitted when a batch row is free (``max_batch``) and the pool can hold every token it may
still write (prompt + ``max_tokens`` - 1: the last token picked is never fed back) on top of what the admitted
requests may still write. Blocks are taken only as tokens arrive (``kv_usage`` counts those), but admission counts
every admitted request's worst case, so a running request always finds the blocks it needs: nothing is ever evicted
or recomputed, and a request that does not fit now waits in the queue (first come, first served) until running ones
end. ``submit`` refuses (ValueError, a 400) a request whose worst case exceeds the whole pool, and raises
``QueueFull`` (a 429) only when more than ``max_queue`` requests would wait beyond the free rows.

A step. (1) Prefill, chunked: prompts being prefilled, oldest first, then newly admitted ones, get their next chunk
within ``max_prefill_tokens`` prompt tokens per step, in one forward (right-padded; each row's earlier chunks are
read from its blocks). A prompt longer than the budget is prefilled over several steps, so it never stalls the
running decodes for longer than one chunk. When a prompt's last chunk ran, its continuations take its blocks (the
first) or forks of them (the others) and pick their first token from the same logits. (2) One decode forward feeds
every running row its last token; attention reads each row's prefix entry and its tokens through its block table
(``fastpeft.ops.paged_prefix_decode``; nothing is gathered or copied). (3) Rows that produced an end-of-sequence
token, reached ``max_tokens``, were cancelled (their client went away) or whose adapter was removed leave; their
blocks go back to the pool.

The engine drives the bank through its public serving API alone: per forward ``pool.append(table, n)`` for each
row, ``cache = pool.step_cache(tables, counts)``, ``routing = bank.route(adapters, B)`` and ``bank.forward(ids,
cache.attention_mask(), routing.position_offsets[:, None] + cache.positions(), routing.prefix_index, cache)``, then
``cache.check_consumed``. Positions follow PEFT's numbering (the virtual tokens first).

Encoder-decoders (T5, MT5, BART: an ``EncoderDecoderAdapterBank``). What differs sits behind a small seam
(``model_kinds``: what a request writes into the pool, how one forward runs); admission, batching, continuations,
sampling, endings and adapter commands are this same code. A request's prompt is the encoder's input: its prefill is
one step that runs the encoder once (prompt-tuning and p-tuning adapters' virtual tokens in front, ``bank.encode``)
and the decoder's first step from the model's decoder start token, whose cross-attention K/V of every encoder
position are written once into pool blocks listed by a second block table of the request (shared, never copied, by
its ``n`` continuations, like the start token's block), and kept until the request ends. Every decode step reads
them through ``fastpeft.ops.paged_prefix_decode`` with no prefix; the decoder's self-attention K/V go into the
request's blocks, a prefix-tuning adapter's prefix read from the bank's tables, and are read in place as a causal LM's
(BART) or gathered (T5, whose relative position bias the paged op does not add). Admission counts both tables' blocks
(encoder positions + the start token and ``max_tokens - 1`` fed-back tokens); an encoder pass is not split, so the
prefill budget counts encoder positions and the last prompt a step admits may pass it. The decoder does not score
the prompt: ``prompt_logprobs`` is refused (ValueError), and the HTTP app answers ``echo`` with 400.

Failures. A forward that raises is run again row by row, so that only the rows that fail alone end (with
``RequestFailed("internal", ...)``) and the others go on with their logits; rewriting a row's K/V in the retry is
harmless (the same tokens at the same positions). Picking a row's token (sampling, log-probabilities) fails that row
alone. Anything else that raises in a step ends every admitted request with an internal error.

Log-probabilities. A request that asks (``logprobs``, ``prompt_logprobs``) gets, beside its tokens, their
log-probabilities under the model and the most likely alternatives: ``log_softmax`` in float32 of the model's raw
logits (its adapter's, as PEFT's forward gives them), before repetition penalty, temperature, top-k or top-p. That is
what OpenAI's API and vLLM (its default ``raw_logprobs``) report and what lm-evaluation-harness sums as a
log-likelihood: the model's distribution, independent of how a token was then picked; the warped one would change
with the sampling settings and give ``-inf`` to every token outside top-k/top-p. Prompt log-probabilities come from
the prefill chunks' logits (position ``i`` scores prompt token ``i + 1``; the first token has none).

Thread model. One engine thread owns the bank, the model and the pool: adding and removing adapters are commands it
runs between steps (so no running row ever reads a table entry that was freed and reused). HTTP handler threads only
submit requests (a bounded queue: ``QueueFull`` when it is full) and read each request's event queue.
"""

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from ..sampling import check_sampling, logits_processors
from .kv_pool import BlockTable, KVBlockPool
from .model_kinds import model_kind

DEFAULT_BLOCK_SIZE = 16
"""Tokens per KV block (vLLM's default: a request's partly filled last block wastes little, block tables stay
short)."""

DEFAULT_MAX_PREFILL_TOKENS = 512
"""Prompt tokens one step prefills at most: a longer prompt takes several steps, each followed by a decode step of
the running requests."""


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
    no such adapter when the request's turn comes), ``"shutting_down"`` or ``"internal"`` (its forward or its token's
    pick failed, or a step failed beyond telling its rows apart). A front end answers from it rather than from the
    engine's adapter list, which may not have caught up yet."""

    reason: str
    message: str

    def __str__(self):
        return self.message


@dataclass(frozen=True)
class KVUsage:
    """How much of the engine's KV pool running requests hold (``Engine.kv_usage``): ``blocks_in_use`` of
    ``blocks_total`` blocks of ``block_tokens`` token positions each, and the bytes those blocks take (keys and values
    of every layer). A block shared by several continuations of one prompt counts once."""

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
        """Ask the engine to drop this request at the next token boundary (its KV blocks are freed then)."""
        self._cancelled = True

    @property
    def cancelled(self):
        return self._cancelled


def continuations(request, n):
    """``n`` requests continuing ``request``'s prompt: ``request`` itself, then copies of it with their own ``events``
    queues. Submit them together (``Engine.submit`` of the list): the prompt is prefilled once and every continuation
    decodes from its K/V blocks, shared (``KVBlockPool.fork``). With a ``seed``, continuation ``i`` samples from a
    generator seeded with ``seed + i`` (vLLM's rule for ``n > 1``): a seeded request repeats itself, and its first
    continuation is what the request alone gives."""
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
    """An admitted request: its block table (None while its prompt is prefilled) and an encoder-decoder's
    cross-attention one, the token it feeds next, its sampling state (``context``: the tokens before its generated
    ones that a repetition penalty sees, the decoder's: the prompt, or an encoder-decoder's start token)."""

    __slots__ = ("request", "table", "cross_table", "last_token", "generator", "processors", "context")

    def __init__(self, request, generator, context):
        self.request, self.generator, self.context = request, generator, context
        self.table, self.cross_table, self.last_token = None, None, None
        self.processors = logits_processors(bool(request.temperature), request.temperature, request.top_k,
                                             request.top_p, request.repetition_penalty)


class _Prompt:
    """The prompt of a group of continuations (``rows``, one or more), being prefilled chunk by chunk into ``table``
    (``table.num_tokens``: its tokens fed so far); ``ids``: the tokens prefilled (a decoder-only model's prompt, an
    encoder-decoder's start token); ``encoder_tokens`` and ``cross_table``: its encoder positions and their
    cross-attention blocks (encoder-decoders; 0 and None otherwise); ``logprobs``: its prompt log-probabilities so
    far, when a row asked."""

    __slots__ = ("rows", "table", "ids", "encoder_tokens", "cross_table", "logprobs")

    def __init__(self, rows, ids, encoder_tokens):
        self.rows, self.table, self.ids = rows, BlockTable(), ids
        self.encoder_tokens = encoder_tokens
        self.cross_table = BlockTable() if encoder_tokens else None
        self.logprobs = [] if any(row.request.prompt_logprobs is not None for row in rows) else None

    @property
    def adapter(self):
        return self.rows[0].request.adapter


class _Feed:
    """One row of a forward: the tokens it feeds into ``table`` (whose ``append`` made room for them), for
    ``adapter``; an encoder-decoder's row also reads ``cross_table``, and on its first step (``encoder_ids``: the
    prompt) writes it."""

    __slots__ = ("table", "tokens", "adapter", "cross_table", "encoder_ids")

    def __init__(self, table, tokens, adapter, cross_table=None, encoder_ids=None):
        self.table, self.tokens, self.adapter = table, tokens, adapter
        self.cross_table, self.encoder_ids = cross_table, encoder_ids


class Engine:
    """Continuous batching of ``GenerationRequest`` s over an open ``AdapterBank``.

    Arguments:
        bank: the ``AdapterBank`` (the engine thread becomes its only user once ``start`` ran): a causal LM's or an
            encoder-decoder's (``EncoderDecoderAdapterBank``: T5, MT5, BART; ``model_kinds.EncoderDecoder``).
        max_batch: the most requests admitted together (prefilling or decoding: the rows of a decode step).
        max_len: the most tokens (prompt + generated) one request may hold.
        max_queue: the most requests waiting beyond the free rows; ``submit`` raises ``QueueFull`` beyond.
        eos_token_ids: ids that end a request (``finish_reason="stop"``); default the model's generation config.
        block_size: tokens per KV block.
        kv_cache_tokens, kv_cache_bytes: the pool's size, as tokens (rounded up to whole blocks) or as bytes (keys
            and values of every layer, rounded down to whole blocks); at most one. Default ``max_batch * max_len``
            tokens: the memory a cache of ``max_len`` slots per row would take, so every batch of ``max_batch``
            requests of ``max_len`` tokens fits.
        max_prefill_tokens: prompt tokens one step prefills at most (chunked prefill; an encoder-decoder's encoder
            positions, whose last prompt in a step may pass it).
    """

    def __init__(self, bank, max_batch=16, max_len=512, max_queue=64, eos_token_ids=None,
                 block_size=DEFAULT_BLOCK_SIZE, kv_cache_tokens=None, kv_cache_bytes=None,
                 max_prefill_tokens=DEFAULT_MAX_PREFILL_TOKENS):
        for name, value, low in (("max_batch", max_batch, 1), ("max_len", max_len, 2), ("max_queue", max_queue, 0),
                                 ("block_size", block_size, 1), ("max_prefill_tokens", max_prefill_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if kv_cache_tokens is not None and kv_cache_bytes is not None:
            raise ValueError("give at most one of kv_cache_tokens and kv_cache_bytes")
        if kv_cache_tokens is None and kv_cache_bytes is None:
            kv_cache_tokens = max_batch * max_len
        self.bank = bank
        self._kind = model_kind(bank)
        num_layers, num_kv_heads, head_dim = self._kind.kv_shape
        self.pool = KVBlockPool.from_budget(num_layers, num_kv_heads, head_dim, block_size,
                                            budget_bytes=kv_cache_bytes, budget_tokens=kv_cache_tokens,
                                            device=bank.device, dtype=bank.dtype)
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        if eos_token_ids is None:
            eos = getattr(getattr(bank.model, "generation_config", None), "eos_token_id", None)
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = set(eos_token_ids)
        self._model_name = type(bank.model).__name__
        self._waiting = deque()   # groups of continuations of one prompt, first come first served
        self._prompts = []        # admitted groups whose prompt is being prefilled (_Prompt)
        self._rows = []           # decoding rows (_Row)
        self._held = 0            # requests admitted and not ended: the rows of _prompts and _rows
        self._commands = deque()
        self._lock = threading.Condition()
        self._paused = False
        self._stop = False
        self._thread = None
        self._adapter_names = tuple(bank.names)
        self.stats = {"steps": 0, "prefills": 0, "prefill_tokens": 0, "max_rows": 0, "tokens": 0, "finished": 0,
                      "cancelled": 0, "failed": 0}

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
        """Admit no new request until ``resume`` (admitted ones go on). For maintenance and tests."""
        with self._lock:
            self._paused = True

    def resume(self):
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    @property
    def scores_prompt(self):
        """Whether requests may ask for their prompt's log-probabilities (``prompt_logprobs``): a decoder-only model
        scores its prompt; an encoder-decoder's decoder does not (the prompt is the encoder's input)."""
        return self._kind.scores_prompt

    @property
    def running(self):
        """Requests admitted and not ended (their prompt being prefilled, or decoding)."""
        return self._held

    def kv_usage(self):
        """A ``KVUsage`` snapshot of the pool (safe to read from any thread)."""
        pool = self.pool
        in_use = pool.blocks_in_use
        return KVUsage(blocks_in_use=in_use, blocks_total=pool.num_blocks, block_tokens=pool.block_size,
                       bytes_in_use=in_use * pool.bytes_per_block, bytes_total=pool.nbytes)

    @property
    def waiting(self):
        """Requests waiting for admission (each continuation of a prompt counts)."""
        with self._lock:
            return sum(len(group) for group in self._waiting)

    def submit(self, request):
        """Queue ``request``, or a list of requests continuing one prompt (``continuations``: same ``prompt_ids`` and
        ``adapter``), admitted together and prefilled once. Raises ``QueueFull`` when the requests would wait beyond
        ``max_queue`` requests past the free rows; ``ValueError`` when one holds no token, has a setting out of range
        or cannot fit ``max_len`` (prompt + max_tokens), when a group does not share its prompt or needs more than
        ``max_batch`` rows, or when the group could never fit the KV pool, even alone. Returns ``request``."""
        group = list(request) if isinstance(request, (list, tuple)) else [request]
        if not group:
            raise ValueError("no request to submit (an empty list)")
        for member in group:
            self._check(member)
        first = group[0]
        if any(member.prompt_ids != first.prompt_ids or member.adapter != first.adapter for member in group[1:]):
            raise ValueError("the continuations of one prompt must share their prompt_ids and adapter")
        if len(group) > self.max_batch:
            raise ValueError(f"n={len(group)} continuations of one prompt need more rows than the server's "
                             f"max_batch of {self.max_batch}")
        needed = self._prompt_blocks_to_come(first, len(group), BlockTable())
        if needed > self.pool.num_blocks:
            pool = self.pool
            raise ValueError(f"prompt ({len(first.prompt_ids)} tokens) + max_tokens ({first.max_tokens})"
                             f"{f' for n={len(group)} continuations' if len(group) > 1 else ''} needs {needed} KV "
                             f"blocks of {pool.block_size} tokens; the server's KV pool holds {pool.num_blocks}")
        with self._lock:
            # Up to max_queue requests wait beyond those the free rows take at the next step.
            waiting = sum(len(queued) for queued in self._waiting)
            free_rows = self.max_batch - self._held
            if waiting + len(group) > self.max_queue + free_rows:
                raise QueueFull(f"{waiting} requests are waiting for {free_rows} free rows "
                                f"(at most {self.max_queue} may wait beyond the free rows)")
            self._waiting.append(group)
            self._lock.notify_all()
        return request

    def _check(self, request):
        """Raise ValueError naming the first setting of ``request`` the engine cannot run."""
        if not request.prompt_ids:
            raise ValueError("the prompt holds no token")
        if isinstance(request.max_tokens, bool) or not isinstance(request.max_tokens, int) or request.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {request.max_tokens!r}")
        if request.prompt_logprobs is not None and not self._kind.scores_prompt:
            raise ValueError("prompt_logprobs: an encoder-decoder's prompt is its encoder's input, which its decoder "
                             "does not score; there are no prompt log-probabilities")
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
        """Remove adapter ``name`` between steps; its admitted and waiting requests end with an error first."""

        def remove(bank):
            if name not in bank:
                raise KeyError(name)
            failure = RequestFailed("adapter_removed", f"adapter {name!r} was removed")
            for row in [r for r in self._rows if r.request.adapter == name]:
                self._finish(row, error=failure)
            for prompt in [p for p in self._prompts if p.adapter == name]:
                self._end_prompt(prompt, failure)
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
                while not self._stop and not self._commands and not self._held and (
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
                self._kind.refresh()
                done.put((True, result) if exc_info is None else (False, exc_info))
            try:
                self._step()
            except Exception as exc:  # a failing step must not leave requests waiting forever
                self._end_admitted(RequestFailed("internal", f"internal error: {exc}"))
        shutting_down = RequestFailed("shutting_down", "the server is shutting down")
        self._end_admitted(shutting_down)
        with self._lock:
            waiting, self._waiting = [request for group in self._waiting for request in group], deque()
        for request in waiting:
            request.events.put(("error", shutting_down))

    def _step(self):
        self._drop_cancelled()
        budget, chunks = self.max_prefill_tokens, []   # (prompt, tokens it feeds this step)
        for prompt in self._prompts:   # admitted earlier, oldest first (an encoder-decoder's prompts end in one step)
            if budget <= 0:
                break
            count = min(len(prompt.ids) - prompt.table.num_tokens, budget)
            chunks.append((prompt, count))
            budget -= count
        while budget > 0:
            prompt = self._admit_next()
            if prompt is None:
                break
            if self._kind.chunked_prefill:
                count = min(len(prompt.ids), budget)
                budget -= count
            else:   # an encoder pass is not split: the budget counts its positions, the last prompt may pass it
                count = len(prompt.ids)
                budget -= prompt.encoder_tokens
            chunks.append((prompt, count))
        self.stats["max_rows"] = max(self.stats["max_rows"], self._held)
        if chunks:
            self._prefill(chunks)
        if self._rows:
            self._decode()

    # ----- admission -------------------------------------------------------------------------------------------

    def _tokens_at_most(self, request):
        """The most tokens ``request`` writes into its blocks: its prefilled tokens (the prompt; an encoder-decoder's
        start token), and every token it picks but the last (a request ends on the token it picks; only the ones
        before are fed back)."""
        return len(self._kind.decoder_prompt(request)) + max(request.max_tokens - 1, 0)

    def _prompt_blocks_to_come(self, request, n, table, cross_table=None):
        """Blocks ``n`` continuations of ``request``'s prompt may still take from the pool, ``table`` holding the
        part of the prompt prefilled so far and ``cross_table`` its encoder positions written so far (encoder-
        decoders: shared by every continuation, never written again; None: none yet): the first continuation's
        blocks (the prompt's among them), and the others' own blocks past the prompt's whole ones (the first of them
        a copy of the prompt's partly filled last block, which the last continuation to write into it keeps).
        ``_blocks_to_come`` counts the same once they decode."""
        block_size = self.pool.block_size
        prompt_length, total = len(self._kind.decoder_prompt(request)), self._tokens_at_most(request)
        blocks = self.pool.blocks_needed(table, total - table.num_tokens)
        encoder_tokens = self._kind.encoder_tokens(request)
        if encoder_tokens:
            cross_table = cross_table or BlockTable()
            blocks += self.pool.blocks_needed(cross_table, encoder_tokens - cross_table.num_tokens)
        if n > 1 and total > prompt_length:
            blocks += (n - 1) * (-(-total // block_size) - prompt_length // block_size)
        return blocks

    def _blocks_to_come(self):
        """Blocks the admitted requests may still take, at most (each one's worst case)."""
        pool = self.pool
        blocks, shared_partial = 0, set()
        for row in self._rows:   # each decoding row feeds at least one more token
            table = row.table
            blocks += pool.blocks_needed(table, self._tokens_at_most(row.request) - table.num_tokens)
            if table.num_tokens % pool.block_size and pool.ref_count(table.blocks[-1]) > 1:
                shared_partial.add(table.blocks[-1])
        # blocks_needed counts a copy of a shared, partly filled last block for each table holding it; the last of
        # them to write finds it no longer shared and writes in place.
        blocks -= len(shared_partial)
        return blocks + sum(self._prompt_blocks_to_come(prompt.rows[0].request, len(prompt.rows), prompt.table,
                                                        prompt.cross_table)
                            for prompt in self._prompts)

    def _admit_next(self):
        """The ``_Prompt`` of the first waiting group, admitted, or None when it cannot start now (paused, no free
        rows, or not enough blocks beyond what admitted requests may still take: it waits, and so do the groups
        behind it). Groups whose requests were all cancelled, or whose adapter is gone, end on the way."""
        while True:
            with self._lock:
                if not self._waiting or self._paused:
                    return None
                group = self._waiting[0]
                live = [request for request in group if not request.cancelled]
                if live and (len(live) > self.max_batch - self._held or self._prompt_blocks_to_come(
                        live[0], len(live), BlockTable()) > self.pool.num_free_blocks - self._blocks_to_come()):
                    return None
                self._waiting.popleft()
                self._held += len(live)
            for request in group:
                if request.cancelled:
                    request.finish_reason = "cancelled"
                    self.stats["cancelled"] += 1
                    request.events.put(("done", "cancelled"))
            if not live:
                continue
            first = live[0]
            ids = self._kind.decoder_prompt(first)
            rows = [_Row(request, self._generator(request), ids) for request in live]
            adapter = first.adapter
            if adapter is not None and adapter not in self.bank:
                failure = RequestFailed("adapter_not_loaded", f"adapter {adapter!r} is not loaded")
                for row in rows:
                    self._finish(row, error=failure)
                continue
            prompt = _Prompt(rows, ids, self._kind.encoder_tokens(first))
            self._prompts.append(prompt)
            return prompt

    def _generator(self, request):
        if request.temperature and request.seed is not None:
            return torch.Generator(self.bank.device).manual_seed(request.seed)
        return None

    # ----- forwards --------------------------------------------------------------------------------------------

    def _prefill(self, chunks):
        """Feed each prompt of ``chunks`` its next ``count`` tokens in one forward; a prompt whose last chunk ran
        starts decoding."""
        feeds = []
        for prompt, count in chunks:
            start = prompt.table.num_tokens
            self.pool.append(prompt.table, count)
            encoder_ids = None
            if prompt.cross_table is not None:   # an encoder-decoder's first step writes its encoder positions
                self.pool.append(prompt.cross_table, prompt.encoder_tokens)
                encoder_ids = prompt.rows[0].request.prompt_ids
            feeds.append(_Feed(prompt.table, prompt.ids[start:start + count], prompt.adapter, prompt.cross_table,
                               encoder_ids))
        scoring_prompt = any(prompt.logprobs is not None for prompt, _ in chunks)
        results = self._forward(feeds, every_position=scoring_prompt)
        self.stats["prefills"] += 1
        # Prompt tokens prefilled: an encoder-decoder's are its encoder positions.
        self.stats["prefill_tokens"] += sum(count if prompt.cross_table is None else prompt.encoder_tokens
                                            for prompt, count in chunks)
        for (prompt, count), logits in zip(chunks, results):
            if isinstance(logits, Exception):
                self._end_prompt(prompt, RequestFailed("internal", f"internal error: {logits}"))
                continue
            if prompt.logprobs is not None:
                self._score_prompt(prompt, logits, count)
            if prompt.table.num_tokens == len(prompt.ids):
                self._start_decoding(prompt, logits[-1])

    def _score_prompt(self, prompt, logits, count):
        """Extend ``prompt.logprobs`` with the chunk's: ``logits [count, vocab]`` at its positions, position ``i``
        scoring prompt token ``i + 1`` (the prompt's last position scores none)."""
        start = prompt.table.num_tokens - count
        scored = min(count, len(prompt.ids) - 1 - start)
        if scored > 0:
            top = max(row.request.prompt_logprobs for row in prompt.rows if row.request.prompt_logprobs is not None)
            prompt.logprobs += _token_logprobs(logits[:scored], prompt.ids[start + 1:start + 1 + scored],
                                               [top] * scored)

    def _start_decoding(self, prompt, logits):
        """The prompt is in the pool: its first continuation takes its blocks, the others share them (forks), each
        gets its prompt log-probabilities (when asked) and picks its first token from ``logits [vocab]``."""
        self._prompts.remove(prompt)
        rows = prompt.rows
        rows[0].table, rows[0].cross_table = prompt.table, prompt.cross_table
        for row in rows[1:]:
            row.table = self.pool.fork(prompt.table)
            if prompt.cross_table is not None:
                row.cross_table = self.pool.fork(prompt.cross_table)
        if prompt.logprobs is not None:
            for row in rows:
                count = row.request.prompt_logprobs
                if count is not None:
                    row.request.events.put(("prompt_logprobs", [None] + [
                        TokenLogprob(entry.token, entry.logprob, entry.top[:count]) for entry in prompt.logprobs]))
        self._rows.extend(rows)
        self._emit(rows, logits.unsqueeze(0).expand(len(rows), -1))

    def _decode(self):
        rows = list(self._rows)
        for row in rows:
            self.pool.append(row.table, 1)   # admission reserved the block, if the token needs a new one
        results = self._forward([_Feed(row.table, [row.last_token], row.request.adapter, row.cross_table)
                                 for row in rows], every_position=False)
        self.stats["steps"] += 1
        going = []
        for row, logits in zip(rows, results):
            if isinstance(logits, Exception):
                self._finish(row, error=RequestFailed("internal", f"internal error: {logits}"))
            else:
                going.append((row, logits))
        if going:
            self._emit([row for row, _ in going], torch.cat([logits for _, logits in going]))

    def _forward(self, feeds, every_position):
        """Each feed's logits: ``[len(tokens), vocab]`` with ``every_position``, else ``[1, vocab]`` at its last
        token. One forward for all; when it raises, one per row, so that a row that fails alone gets its exception in
        place of logits and the others their logits."""
        try:
            return self._forward_together(feeds, every_position)
        except Exception as error:
            if len(feeds) == 1:
                return [error]
        results = []
        for feed in feeds:
            try:
                results.append(self._forward_together([feed], every_position)[0])
            except Exception as error:
                results.append(error)
        return results

    def _forward_together(self, feeds, every_position):
        """One forward of ``feeds`` through the bank's serving API (the model kind's: see the module's docstring)."""
        return self._kind.forward(self.pool, feeds, every_position, self._model_name)

    # ----- tokens and endings ----------------------------------------------------------------------------------

    def _emit(self, rows, logits):
        """Pick each row's next token from ``logits [B, vocab]``, hand it (and its log-probabilities, when asked) to
        the client, end finished rows. A row with ``max_tokens`` 0 ends here without a token; a row whose pick
        raises ends with an internal error, alone."""
        picking = [(b, row) for b, row in enumerate(rows) if row.request.max_tokens > 0]
        for row in rows:
            if row.request.max_tokens == 0:
                self._finish(row, reason="length")
        if not picking:
            return
        greedy = logits.float().argmax(-1).tolist()
        picked = []
        for b, row in picking:
            try:
                picked.append((b, row, self._pick(row, logits[b:b + 1], greedy[b])))
            except Exception as error:
                self._finish(row, error=RequestFailed("internal", f"internal error: {error}"))
        # From the raw logits (not the processors' scores): the model's distribution, see the module's docstring.
        asking = [(b, row, token) for b, row, token in picked if row.request.logprobs is not None]
        logprobs = {}
        if asking:
            entries = _token_logprobs(logits[[b for b, _, _ in asking]], [token for _, _, token in asking],
                                      [row.request.logprobs for _, row, _ in asking])
            logprobs = {id(row): entry for (_, row, _), entry in zip(asking, entries)}
        for _, row, token in picked:
            request = row.request
            self.stats["tokens"] += 1
            if id(row) in logprobs:
                request.events.put(("logprobs", logprobs[id(row)]))
            if token in self.eos_token_ids and not request.ignore_eos:
                self._finish(row, reason="stop")
                continue
            request.generated.append(token)
            request.events.put(("token", token))
            row.last_token = token
            if len(request.generated) >= request.max_tokens:
                self._finish(row, reason="length")

    @staticmethod
    def _pick(row, logits, greedy_token):
        """``row``'s next token from its ``logits [1, vocab]`` (``greedy_token``: their argmax)."""
        request = row.request
        if not (request.temperature or row.processors):
            return greedy_token
        ids = torch.tensor([row.context + request.generated], device=logits.device)
        scores = row.processors(ids, logits.float())
        if request.temperature:
            return int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator)[0, 0])
        return int(scores.argmax(-1)[0])

    def _drop_cancelled(self):
        for row in [r for r in self._rows if r.request.cancelled]:
            self._finish(row, reason="cancelled")
        for prompt in list(self._prompts):
            for row in [r for r in prompt.rows if r.request.cancelled]:
                prompt.rows.remove(row)
                self._finish(row, reason="cancelled")
            if not prompt.rows:   # no continuation left to prefill it for
                self._prompts.remove(prompt)
                self._free_prompt(prompt)

    def _end_prompt(self, prompt, failure):
        """End every continuation of a prompt being prefilled with ``failure``; its blocks go back."""
        self._prompts.remove(prompt)
        self._free_prompt(prompt)
        for row in prompt.rows:
            self._finish(row, error=failure)

    def _free_prompt(self, prompt):
        self.pool.free(prompt.table)
        if prompt.cross_table is not None:
            self.pool.free(prompt.cross_table)

    def _end_admitted(self, failure):
        """End every admitted request with ``failure`` (a step failed beyond telling rows apart, or shutdown)."""
        for prompt in list(self._prompts):
            self._end_prompt(prompt, failure)
        for row in list(self._rows):
            self._finish(row, error=failure)

    def _finish(self, row, reason=None, error=None):
        """End an admitted ``row`` (decoding, or waiting for its prompt's prefill): its blocks go back to the pool
        (blocks shared with other continuations stay theirs) and its client gets ``("done", reason)`` or
        ``("error", error)``."""
        if row in self._rows:
            self._rows.remove(row)
        for table in (row.table, row.cross_table):
            if table is not None:
                self.pool.free(table)
        with self._lock:
            self._held -= 1
        request = row.request
        if error is not None:
            if error.reason == "internal":
                self.stats["failed"] += 1
            request.events.put(("error", error))
            return
        request.finish_reason = reason
        self.stats["finished"] += 1
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        request.events.put(("done", reason))
