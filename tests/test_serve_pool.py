"""The serving engine on its paged KV pool (``fastpeft.serve.engine`` over ``fastpeft.serve.kv_pool``), engine level:
a pool far smaller than the load (requests wait for blocks and all complete equal to PEFT), chunked prefill
interleaved with running decodes (outputs and prompt log-probabilities unchanged), ``n`` continuations sharing the
prompt's blocks, requests that could never fit refused at submit, an adapter removed while its prompt is being
prefilled, one failing row among healthy ones, and the engine's refusals.

A tiny Llama (``serve_fixtures``) with a prefix-tuning and a prompt-tuning tenant; every greedy response is compared
with PEFT's forward looped without a cache for that tenant alone. ``EngineGate`` stops the engine between two steps
where a test reads its state.
"""

import contextlib
import math
import threading
import time

import pytest
import torch

from fastpeft import tiny

from .serve_fixtures import EngineGate, peft_greedy, peft_tenant, tiny_llama

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def tenants():
    return {"a": peft_tenant("prefix", 1), "b": peft_tenant("prompt", 2), None: None}


@pytest.fixture(scope="module")
def bank(tenants):
    from fastpeft import AdapterBank

    with AdapterBank(tiny_llama()) as bank:
        for name in ("a", "b"):
            bank.add(name, tenants[name])
        yield bank


@contextlib.contextmanager
def running_engine(bank, **options):
    from fastpeft.serve import Engine

    engine = Engine(bank, **options).start()
    try:
        yield engine
    finally:
        engine.stop()


def _wait(request):
    """The request's events up to its end (``done`` or ``error``)."""
    events = []
    while not events or events[-1][0] not in ("done", "error"):
        events.append(request.events.get(timeout=TIMEOUT_S))
    return events


def _until(condition):
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _prompt(seed, length):
    generator = torch.Generator().manual_seed(seed)
    return [tiny.BOS_ID] + torch.randint(3, tiny.VOCAB_SIZE, (length - 1,), generator=generator).tolist()


def test_an_exhausted_pool_makes_requests_wait_and_every_one_completes_equal_to_peft(bank, tenants):
    """20 requests from concurrent submitters on a pool of 10 blocks of 4 tokens (each request may write up to 6
    blocks): they wait in the queue for blocks, not for rows (fewer ever run together than max_batch allows), none
    fails, every response equals PEFT's, and the pool is empty at the end."""
    from fastpeft.serve import GenerationRequest

    jobs = [(("a", "b", None)[i % 3], _prompt(i, 3 + i % 10), 4 + i % 7) for i in range(20)]
    with running_engine(bank, max_batch=8, max_len=64, max_queue=32, block_size=4, kv_cache_tokens=40) as engine:
        assert engine.pool.num_blocks == 10
        requests = [None] * len(jobs)

        def submit(i):
            adapter, prompt, max_tokens = jobs[i]
            requests[i] = engine.submit(GenerationRequest(prompt_ids=prompt, adapter=adapter, max_tokens=max_tokens))

        submitters = [threading.Thread(target=submit, args=(i,)) for i in range(len(jobs))]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join(TIMEOUT_S)
        ends = [_wait(request)[-1] for request in requests]
        assert all(end[0] == "done" for end in ends), ends
        assert engine.stats["failed"] == 0 and engine.stats["finished"] == len(jobs)
        # Each request may write at least 2 blocks (6+ tokens): at most 5 of the 10 blocks' worth run together.
        assert engine.stats["max_rows"] <= 5 < engine.max_batch
        assert engine.kv_usage().blocks_in_use == 0
    for (adapter, prompt, max_tokens), request in zip(jobs, requests):
        assert request.generated == peft_greedy(tenants[adapter], prompt, max_tokens), (adapter, prompt)


def test_chunked_prefill_interleaves_with_running_decodes_and_changes_no_output(bank, tenants):
    """With 4 prompt tokens per step, a 41-token prompt admitted beside a 3-token one takes 11 prefill steps (1 token,
    then 10 chunks of 4), each followed by a decode step of the request already running: that request's tokens keep
    coming while the long prompt is prefilled. Both responses, and the long prompt's log-probabilities (gathered chunk
    by chunk), equal PEFT's."""
    from fastpeft.serve import GenerationRequest

    order = []

    class Recorder:   # a request's events queue that also records the order of every request's events
        def __init__(self, name):
            self.name, self.events = name, []

        def put(self, event):
            order.append((self.name, event[0]))
            self.events.append(event)

    short_prompt, long_prompt = _prompt(1, 3), _prompt(2, 41)
    short_events, long_events = Recorder("short"), Recorder("long")
    with running_engine(bank, max_batch=4, max_len=128, block_size=4, max_prefill_tokens=4) as engine:
        engine.pause()
        short = engine.submit(GenerationRequest(prompt_ids=short_prompt, adapter="a", max_tokens=30, ignore_eos=True,
                                                events=short_events))
        long = engine.submit(GenerationRequest(prompt_ids=long_prompt, adapter="b", max_tokens=5,
                                               prompt_logprobs=2, events=long_events))
        engine.resume()
        _until(lambda: short.finish_reason is not None and long.finish_reason is not None)
        stats = dict(engine.stats)
    assert stats["prefills"] == 11 and stats["prefill_tokens"] == 3 + 41
    # The short request's first token comes from its prefill, then one per decode step (10 of them) before the long
    # prompt's last chunk.
    first_long_token = order.index(("long", "token"))
    assert order[:first_long_token].count(("short", "token")) == 11
    assert short.generated == peft_greedy(tenants["a"], short_prompt, 30)
    assert long.generated == peft_greedy(tenants["b"], long_prompt, 5)
    (kind, entries), = [event for event in long_events.events if event[0] == "prompt_logprobs"]
    with torch.no_grad():
        logits = tenants["b"](input_ids=torch.tensor([long_prompt])).logits[0, -len(long_prompt):-1]
    expected = logits.float().log_softmax(-1)
    assert entries[0] is None and len(entries) == len(long_prompt)
    torch.testing.assert_close(torch.tensor([entry.logprob for entry in entries[1:]]),
                               expected[torch.arange(len(long_prompt) - 1), torch.tensor(long_prompt[1:])],
                               rtol=1e-5, atol=1e-6)
    assert all(len(entry.top) == 2 and entry.top[0][1] == pytest.approx(expected[i].max().item(), rel=1e-5)
               for i, entry in enumerate(entries[1:]))


def test_n_continuations_share_the_prompts_blocks(bank, tenants):
    """4 continuations of a 10-token prompt (blocks of 4: two whole blocks and a partly filled one) hold the two whole
    blocks once: after a few steps the pool holds 2 shared blocks plus each continuation's own ones (the last to
    write keeps the prompt's partly filled block), less than 4 copies. Greedy, each equals PEFT's; sampled with a
    seed, continuation j equals the request alone with seed + j."""
    from fastpeft.serve import GenerationRequest
    from fastpeft.serve.engine import continuations

    prompt = _prompt(3, 10)
    with running_engine(bank, max_batch=4, max_len=64, block_size=4) as engine:
        before = EngineGate(engine).wait()
        group = continuations(GenerationRequest(prompt_ids=prompt, adapter="b", max_tokens=12, ignore_eos=True), 4)
        engine.submit(group)
        gates = [EngineGate(engine)]
        before.release()
        for _ in range(3):   # three steps: the prefill (and a decode), then two decodes
            gates[-1].wait()
            gates.append(EngineGate(engine))
            gates[-2].release()
        gates[-1].wait()
        try:
            tokens = len(prompt) + len(group[0].generated) - 1   # each continuation's tokens in the pool
            assert [len(request.generated) for request in group] == [5] * 4
            own = math.ceil(tokens / 4) - 2   # past the two shared whole blocks
            assert engine.kv_usage().blocks_in_use == 2 + 4 * own < 4 * math.ceil(tokens / 4)
        finally:
            gates[-1].release()
        for request in group:
            assert _wait(request)[-1] == ("done", "length")
        assert engine.kv_usage().blocks_in_use == 0
        expected = peft_greedy(tenants["b"], prompt, 12)
        assert [request.generated for request in group] == [expected] * 4

        sampled = dict(prompt_ids=prompt, adapter="a", max_tokens=8, temperature=0.9, top_p=0.95, ignore_eos=True)
        together = continuations(GenerationRequest(seed=11, **sampled), 3)
        engine.submit(together)
        alone = [engine.submit(GenerationRequest(seed=11 + j, **sampled)) for j in range(3)]
        for request in together + alone:
            _wait(request)
        assert [request.generated for request in together] == [request.generated for request in alone]
        assert len({tuple(request.generated) for request in together}) == 3


def test_submit_refuses_what_could_never_fit_the_pool(bank):
    """A request whose prompt + max_tokens needs more blocks than the whole pool holds is a ValueError at submit (the
    server's 400), as is a group of continuations that needs more, together; what fits is queued."""
    from fastpeft.serve import Engine, GenerationRequest
    from fastpeft.serve.engine import continuations

    engine = Engine(bank, max_batch=4, max_len=64, block_size=4, kv_cache_tokens=32)   # 8 blocks; not started
    with pytest.raises(ValueError, match="needs 9 KV blocks of 4 tokens; the server's KV pool holds 8"):
        engine.submit(GenerationRequest(prompt_ids=_prompt(0, 20), max_tokens=17))
    engine.submit(GenerationRequest(prompt_ids=_prompt(0, 20), max_tokens=13))   # 32 tokens: the whole pool
    # 3 continuations of 10 + 7 tokens: the prompt's 2 whole blocks once, then 3 x (5 - 2) blocks of their own
    with pytest.raises(ValueError, match="for n=3 continuations needs 11 KV blocks"):
        engine.submit(continuations(GenerationRequest(prompt_ids=_prompt(1, 10), max_tokens=8), 3))
    engine.submit(continuations(GenerationRequest(prompt_ids=_prompt(1, 10), max_tokens=8), 2))
    assert engine.waiting == 3


def test_an_adapter_removed_while_its_prompt_is_prefilled_ends_it_and_frees_its_blocks(bank, tenants):
    """Chunked prefill of a long prompt (2 tokens per step); its adapter is removed between two chunks: the request
    ends with ``adapter_removed``, its blocks go back, and a request of another tenant decoding beside it goes on
    to the end, equal to PEFT's."""
    from fastpeft.serve import GenerationRequest

    with running_engine(bank, max_batch=4, max_len=128, block_size=4, max_prefill_tokens=2) as engine:
        engine.add_adapter("temp", tenants["a"])
        beside_prompt = _prompt(5, 2)
        gate = EngineGate(engine).wait()
        beside = engine.submit(GenerationRequest(prompt_ids=beside_prompt, adapter="b", max_tokens=40,
                                                 ignore_eos=True))
        doomed = engine.submit(GenerationRequest(prompt_ids=_prompt(6, 60), adapter="temp", max_tokens=4))
        after_some_steps = EngineGate(engine)
        gate.release()
        after_some_steps.wait()   # one step: the beside request prefilled, the doomed prompt not started
        later = EngineGate(engine)
        after_some_steps.release()
        later.wait()              # a second step: the doomed prompt's first chunk in the pool
        try:
            assert doomed.generated == [] and engine.running == 2 and engine.kv_usage().blocks_in_use >= 2
            remover = threading.Thread(target=engine.remove_adapter, args=("temp",))
            remover.start()       # its command runs between two steps: with 30 chunks to go, still mid-prefill
            time.sleep(0.2)       # (queued at once; the engine stands still until the gate opens)
        finally:
            later.release()
        remover.join(TIMEOUT_S)
        end = _wait(doomed)[-1]
        assert end[0] == "error" and end[1].reason == "adapter_removed" and doomed.generated == []
        assert _wait(beside)[-1] == ("done", "length")
        assert beside.generated == peft_greedy(tenants["b"], beside_prompt, 40)
        assert engine.kv_usage().blocks_in_use == 0 and "temp" not in engine.adapter_names()


def test_a_forward_that_fails_for_one_row_ends_that_row_alone(bank, tenants, monkeypatch):
    """The bank's forward raises whenever a batch holds a row of tenant "b" (an adapter whose forward breaks): the
    engine runs the batch again row by row, so the "b" requests end with an internal error and the others, in the
    same batches, complete equal to PEFT's."""
    from fastpeft.serve import GenerationRequest

    broken_entry = bank.route(["b"], 1).prefix_index[0].item()
    forward = bank.forward

    def failing_forward(input_ids, attention_mask, position_ids, prefix_index, *args, **kwargs):
        if bool((prefix_index == broken_entry).any()):
            raise RuntimeError("tenant b's forward is broken")
        return forward(input_ids, attention_mask, position_ids, prefix_index, *args, **kwargs)

    monkeypatch.setattr(bank, "forward", failing_forward)
    jobs = [("a", _prompt(7, 5), 6), ("b", _prompt(8, 4), 6), (None, _prompt(9, 6), 6), ("b", _prompt(10, 3), 6)]
    with running_engine(bank, max_batch=4, max_len=64, block_size=4) as engine:
        engine.pause()
        requests = [engine.submit(GenerationRequest(prompt_ids=prompt, adapter=adapter, max_tokens=max_tokens))
                    for adapter, prompt, max_tokens in jobs]
        engine.resume()
        ends = [_wait(request)[-1] for request in requests]
        assert engine.stats["failed"] == 2 and engine.kv_usage().blocks_in_use == 0
    for (adapter, prompt, max_tokens), request, end in zip(jobs, requests, ends):
        if adapter == "b":
            assert end[0] == "error" and end[1].reason == "internal" and "broken" in end[1].message
        else:
            assert end[0] == "done" and request.generated == peft_greedy(tenants[adapter], prompt, max_tokens)


def test_the_engine_refuses_bad_options(bank):
    from fastpeft.serve import Engine

    with pytest.raises(ValueError, match="at most one of kv_cache_tokens and kv_cache_bytes"):
        Engine(bank, kv_cache_tokens=64, kv_cache_bytes=1 << 20)
    for option in ("max_prefill_tokens", "block_size", "max_batch"):
        with pytest.raises(ValueError, match=option):
            Engine(bank, **{option: 0})
    with pytest.raises(ValueError, match="holds no block"):
        Engine(bank, kv_cache_bytes=1)
    engine = Engine(bank, max_batch=2, max_len=40, block_size=8)
    assert engine.pool.num_blocks == 10 and engine.kv_usage().bytes_total == engine.pool.nbytes
    sized = Engine(bank, block_size=8, kv_cache_bytes=3 * engine.pool.bytes_per_block + 1)
    assert sized.pool.num_blocks == 3
