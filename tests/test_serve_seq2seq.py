"""Serving encoder-decoder banks (T5, BART): the engine's continuous batching over the paged KV pool with the
encoder run once per request, the decoder's self-attention K/V in the request's blocks and the cross-attention K/V in
blocks of its own, read by the paged decode.

Every greedy reply equals PEFT's forward looped without a cache for that adapter alone (``peft_alone_greedy``:
decoder_input_ids grown one token at a time, never ``generate``), for a mix of prefix tuning (with and without
projection), prompt tuning, p-tuning and no adapter, submitted together so that rows of different decoder lengths,
encoder lengths and prefixes share every decode step. What would change the numbers if it were wrong: a row's
cross-attention reading another row's blocks or a stale block, the decoder's positions (BART's embedding per row,
T5's relative bias over right-aligned keys and over each row's own prefix columns), a prefix copied or missed."""

import threading
import time

import pytest
import torch

from fastpeft import AdapterBank
from fastpeft.integration.reference_generate import generate_seq2seq_without_cache
from fastpeft.serve import Engine, GenerationRequest
from fastpeft.serve.engine import continuations
from tests.test_bank_seq2seq import VOCAB, make_peft_model, tiny_seq2seq

TIMEOUT_S = 120
TENANTS = {"prefix": 1, "prefix-proj": 2, "prompt": 3, "p-tuning": 4}   # PEFT adapter kind -> seed
# (adapter, prompt length, max_tokens): every kind, no adapter, encoder lengths across block boundaries
MIX = (("prefix", 5, 7), (None, 3, 9), ("prompt", 9, 6), ("p-tuning", 2, 8), ("prefix-proj", 7, 5),
       ("prefix", 11, 4), (None, 6, 6), ("prompt", 1, 9))


def _prompt(seed, length):
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def peft_alone_greedy(model, prompt, max_tokens):
    """PEFT's model (or the base model) on this prompt alone: greedy new tokens of its forward looped without a cache,
    ended at the model's eos as the engine ends a request, and the log-probability of each token picked (the eos
    that ended it included)."""
    eos = model.generation_config.eos_token_id
    sequence, logits = generate_seq2seq_without_cache(model, torch.tensor([prompt]), max_new_tokens=max_tokens,
                                                      eos_token_id=eos,
                                                      pad_token_id=model.generation_config.pad_token_id)
    new = sequence[0, 1:].tolist()
    logprobs = [float(logits[i, 0].log_softmax(-1)[token]) for i, token in enumerate(new)]
    return (new[:new.index(eos)], logprobs[:new.index(eos) + 1]) if eos in new else (new, logprobs)


@pytest.fixture(scope="module", params=["t5", "bart"])
def family_setup(request):
    family = request.param
    tenants = {kind: make_peft_model(family, kind, seed) for kind, seed in TENANTS.items()}
    return {"family": family, "tenants": tenants, "base": tiny_seq2seq(family)}


def _bank(setup):
    bank = AdapterBank(tiny_seq2seq(setup["family"]))
    for name, model in setup["tenants"].items():
        bank.add(name, model)
    return bank


def _run(engine, requests):
    """Submit every request (a request or a list of continuations) at once; wait for all to end."""
    for request in requests:
        engine.submit(request)
    flat = [r for request in requests for r in (request if isinstance(request, list) else [request])]
    deadline = time.monotonic() + TIMEOUT_S
    events = {id(r): [] for r in flat}
    for r in flat:
        while True:
            kind, value = r.events.get(timeout=max(deadline - time.monotonic(), 1))
            events[id(r)].append((kind, value))
            if kind in ("done", "error"):
                break
    return events


def _expected(setup, adapter, prompt, max_tokens):
    model = setup["base"] if adapter is None else setup["tenants"][adapter]
    return peft_alone_greedy(model, prompt, max_tokens)


@pytest.mark.parametrize("max_batch,kv_cache_tokens,max_prefill_tokens", [(8, None, 512), (8, None, 12),
                                                                          (3, None, 512), (8, 40, 512)])
def test_mixed_concurrent_requests_equal_peft_alone(family_setup, max_batch, kv_cache_tokens, max_prefill_tokens):
    """Every kind and no adapter in one running batch, on a pool of small blocks (the encoder positions and the
    decoder tokens cross block boundaries): each request's greedy tokens and their log-probabilities equal PEFT's for
    its adapter alone. With a prefill budget of 12 encoder positions, or 3 rows, requests join while others decode,
    so a decode step mixes rows of different decoder lengths; with a pool of 40 token positions (10 blocks) requests
    wait for blocks (admission by worst case) and every one completes."""
    with _bank(family_setup) as bank:
        engine = Engine(bank, max_batch=max_batch, max_len=64, block_size=4, kv_cache_tokens=kv_cache_tokens,
                        max_prefill_tokens=max_prefill_tokens)
        peak, stop = [], threading.Event()
        engine.start()
        try:
            requests = [GenerationRequest(_prompt(i, length), adapter=adapter, max_tokens=max_tokens, logprobs=0)
                        for i, (adapter, length, max_tokens) in enumerate(MIX)]
            encoder_positions = sum(length + bank.encoder_virtual_tokens(adapter) for adapter, length, _ in MIX)
            watcher = threading.Thread(target=_watch_blocks, args=(engine, stop, peak), daemon=True)
            watcher.start()
            events = _run(engine, requests)
            stop.set()
            watcher.join(TIMEOUT_S)
            assert engine.kv_usage().blocks_in_use == 0
        finally:
            engine.stop()
    for i, (request, (adapter, length, max_tokens)) in enumerate(zip(requests, MIX)):
        assert events[id(request)][-1] == ("done", request.finish_reason), events[id(request)][-1]
        tokens, logprobs = _expected(family_setup, adapter, _prompt(i, length), max_tokens)
        assert request.generated == tokens, (i, adapter)
        served = [value.logprob for kind, value in events[id(request)] if kind == "logprobs"]
        assert served == pytest.approx(logprobs, abs=1e-4), (i, adapter)
    assert engine.stats["max_rows"] == min(max_batch, len(MIX)) or kv_cache_tokens is not None
    assert engine.stats["prefill_tokens"] == encoder_positions
    if max_prefill_tokens < 512:   # the budget spread the admissions over several steps
        assert engine.stats["prefills"] > 1
    if kv_cache_tokens is not None:   # the pool, not the rows, held requests back; nothing was evicted
        assert engine.stats["max_rows"] < len(MIX) and max(peak) <= engine.pool.num_blocks
        assert engine.stats["failed"] == 0


def _watch_blocks(engine, stop, peak):
    while not stop.is_set():
        peak.append(engine.kv_usage().blocks_in_use)
        time.sleep(0.001)


def test_n_continuations_share_one_encoder_pass_and_a_seed_repeats(family_setup):
    """n=3 continuations of one prompt: the encoder runs once for them (and never in a decode step), their
    cross-attention blocks are shared; sampled with a seed, the group repeats itself and its first continuation is
    what the request alone gives; greedy continuations equal PEFT's each. The pool holds exactly the group's worst
    case counting the shared blocks once: 4 blocks of encoder positions (9 + 4 virtual tokens) and 2 blocks of
    decoder tokens per continuation (the start token's block shared until each writes into it)."""
    with _bank(family_setup) as bank:
        encoder_calls = []
        hook = bank.model.get_encoder().register_forward_hook(lambda *args: encoder_calls.append(1))
        engine = Engine(bank, max_batch=4, max_len=64, block_size=4, kv_cache_tokens=4 * (4 + 3 * 2)).start()
        try:
            prompt = _prompt(40, 9)

            def sampled(n):
                group = continuations(GenerationRequest(prompt, adapter="prompt", max_tokens=8, temperature=1.0,
                                                        seed=7, ignore_eos=True), n)
                _run(engine, [group])
                return [request.generated for request in group]

            first, again = sampled(3), sampled(3)
            assert first == again and len({tuple(tokens) for tokens in first}) > 1
            assert encoder_calls == [1, 1]
            assert sampled(1) == first[:1]
            greedy = continuations(GenerationRequest(prompt, adapter="prefix", max_tokens=6), 2)
            _run(engine, [greedy])
            assert engine.kv_usage().blocks_in_use == 0
        finally:
            engine.stop()
            hook.remove()
    expected, _ = _expected(family_setup, "prefix", prompt, 6)
    assert [request.generated for request in greedy] == [expected, expected]


def test_a_decode_step_that_fails_for_one_row_ends_that_row_alone(family_setup, monkeypatch):
    """The bank's decoder forward raises in decode steps whenever a batch holds a p-tuning row: the engine runs the
    step again row by row, so the p-tuning requests end with an internal error (their self- and cross-attention
    blocks freed) and the others, in the same steps, complete equal to PEFT's."""
    with _bank(family_setup) as bank:
        broken_entry = bank.slot_of("p-tuning").encoder
        forward = bank.forward

        def failing_forward(encoder_outputs, encoder_mask, ids, routing, cache=None, **kwargs):
            if not cache.cross_attention_cache.writing and broken_entry in routing.prompt_entries:
                raise RuntimeError("p-tuning's decode step is broken")
            return forward(encoder_outputs, encoder_mask, ids, routing, cache, **kwargs)

        monkeypatch.setattr(bank, "forward", failing_forward)
        engine = Engine(bank, max_batch=4, max_len=64, block_size=4).start()
        try:
            jobs = [("prefix", _prompt(50, 5), 6), ("p-tuning", _prompt(51, 4), 6), (None, _prompt(52, 6), 6),
                    ("p-tuning", _prompt(53, 3), 6)]
            requests = [GenerationRequest(prompt, adapter=adapter, max_tokens=max_tokens)
                        for adapter, prompt, max_tokens in jobs]
            events = _run(engine, requests)
            assert engine.stats["failed"] == 2 and engine.kv_usage().blocks_in_use == 0
        finally:
            engine.stop()
    for (adapter, prompt, max_tokens), request in zip(jobs, requests):
        end = events[id(request)][-1]
        if adapter == "p-tuning":
            assert end[0] == "error" and end[1].reason == "internal" and "broken" in end[1].message
            assert len(request.generated) == 1   # its first token came from the step that wrote its cross K/V
        else:
            assert end[0] == "done" and request.generated == _expected(family_setup, adapter, prompt, max_tokens)[0]


def test_a_decode_step_ignores_a_mask_the_model_built_only_where_the_caller_says_so():
    """BART's decoder builds a mask of ones when it gets none, which fastpeft's mask function hands to attention on
    accelerators: a paged decode step whose caller passed no mask (``model_mask_redundant``) reads the block table
    alone and gives what it gives without that mask; any other paged decode step still refuses a mask."""
    from types import SimpleNamespace

    from fastpeft.integration.attention import PAGED_KWARG, fastpeft_attention_forward
    from fastpeft.serve.kv_pool import BlockTable, KVBlockPool

    pool = KVBlockPool(1, 2, 8, 4, 3)
    table = BlockTable()
    pool.append(table, 6)
    torch.manual_seed(0)
    for cache in pool.key_caches + pool.value_caches:
        cache.normal_()
    module = SimpleNamespace(layer_idx=0, is_causal=True, training=False)
    query = torch.randn(1, 4, 1, 8)
    new = torch.zeros(1, 2, 1, 8)   # the layer wrote the new token's K/V into the pool already
    ones = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    with torch.inference_mode():
        def attend(mask, redundant):
            step = pool.step_cache([table], [1], model_mask_redundant=redundant)
            return fastpeft_attention_forward(module, query, new, new, mask, **{PAGED_KWARG: step})[0]

        assert torch.equal(attend(ones, True), attend(None, False))
        with pytest.raises(ValueError, match="takes no attention mask"):
            attend(ones, False)


def test_prompt_logprobs_are_refused_naming_the_field(family_setup):
    with _bank(family_setup) as bank:
        engine = Engine(bank, max_batch=2, max_len=32)
        assert not engine.scores_prompt
        with pytest.raises(ValueError, match="prompt_logprobs"):
            engine.submit(GenerationRequest([5, 6, 7], prompt_logprobs=1))
        with pytest.raises(ValueError, match="context"):
            engine.submit(GenerationRequest(list(range(3, 30)), max_tokens=10))


# ----- over HTTP, through the official openai client ---------------------------------------------------------------

BASE = "seq2seq-base"
TOKEN = "admin-secret"


@pytest.fixture(scope="module")
def served(family_setup):
    """``fastpeft serve``'s app on the family's tiny model with the four tenants; a pool of 16 blocks of 4 positions,
    so that a few requests (each needs 3 to 8 blocks at worst) hold it all and the others wait for blocks."""
    pytest.importorskip("openai")
    from fastpeft import tiny
    from fastpeft.serve import build_server

    server = build_server(tiny_seq2seq(family_setup["family"]), tiny.build_tokenizer(), family_setup["tenants"],
                          base_name=BASE, admin_token=TOKEN, max_batch=6, max_len=80, max_queue=16,
                          max_tokens_limit=64, default_temperature=0.0, kv_block_size=4,
                          kv_cache_tokens=64).start()
    yield {**family_setup, "server": server}
    server.close()


def _client(served):
    import openai

    return openai.OpenAI(base_url=served["server"].url + "/v1", api_key=TOKEN, max_retries=0, timeout=TIMEOUT_S)


def _wait_idle(engine):
    deadline = time.monotonic() + TIMEOUT_S
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.waiting == 0


def test_concurrent_mixed_completions_equal_peft_and_wait_for_blocks(served):
    """Twelve concurrent completions (every kind, no adapter; prompts as token ids) on a pool that holds at most 5
    of them at once: every one completes (no 429: the queue holds them), its tokens and their log-probabilities equal
    PEFT's forward loop for its adapter alone; the pool, not the 6 rows, limited how many ran together."""
    engine = served["server"].engine
    _wait_idle(engine)
    client = _client(served)
    cases = [(adapter, _prompt(100 + i, length), max_tokens) for i, (adapter, length, max_tokens) in
             enumerate(MIX + (("p-tuning", 4, 6), ("prefix-proj", 3, 9), (None, 8, 5), ("prefix", 2, 7)))]
    replies = [None] * len(cases)

    def ask(i):
        adapter, prompt, max_tokens = cases[i]
        replies[i] = client.completions.create(model=adapter or BASE, prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, logprobs=1, extra_body={"return_token_ids": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    for (adapter, prompt, max_tokens), reply in zip(cases, replies):
        tokens, logprobs = _expected(served, adapter, prompt, max_tokens)
        choice = reply.choices[0]
        assert choice.token_ids == tokens, adapter
        assert choice.finish_reason == ("length" if len(tokens) == max_tokens else "stop")
        assert choice.logprobs.token_logprobs[:len(tokens)] == pytest.approx(logprobs[:len(tokens)], abs=1e-4)
        assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(tokens)
    assert 1 < engine.stats["max_rows"] < 6
    _wait_idle(engine)
    assert engine.kv_usage().blocks_in_use == 0


def test_streaming_equals_the_whole_reply(served):
    client = _client(served)
    for adapter in ("prefix", "prompt", None):
        arguments = dict(model=adapter or BASE, prompt=_prompt(7, 6), max_tokens=12, temperature=0)
        whole = client.completions.create(**arguments)
        chunks = list(client.completions.create(**arguments, stream=True, stream_options={"include_usage": True}))
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_cuts_the_text_and_ends_the_request(served):
    client = _client(served)
    arguments = dict(model="prompt", prompt=_prompt(13, 5), max_tokens=12, temperature=0,
                     extra_body={"ignore_eos": True})
    text = client.completions.create(**arguments).choices[0].text
    stop = next(char for char in text[1:] if char.isprintable())
    for stream in (False, True):
        reply = client.completions.create(**arguments, stop=[stop], stream=stream)
        choices = [chunk.choices[0] for chunk in reply] if stream else reply.choices
        assert "".join(choice.text for choice in choices) == text[:text.index(stop)]
        assert choices[-1].finish_reason == "stop"


def test_n_choices_with_a_seed_are_reproducible(served):
    client = _client(served)
    arguments = dict(model="prefix-proj", prompt=_prompt(8, 5), max_tokens=10, temperature=1.0, n=3, seed=11,
                     extra_body={"ignore_eos": True, "return_token_ids": True})
    first, again = client.completions.create(**arguments), client.completions.create(**arguments)
    assert [c.token_ids for c in first.choices] == [c.token_ids for c in again.choices]
    assert len({tuple(c.token_ids) for c in first.choices}) > 1 and first.usage.completion_tokens == 30


def test_echo_and_prompt_logprobs_are_refused_with_400(served):
    import openai

    client = _client(served)
    for extra in ({"echo": True}, {"echo": True, "logprobs": 2, "max_tokens": 0}):
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model="prompt", prompt=_prompt(9, 4), **{"max_tokens": 3, **extra})
        assert error.value.status_code == 400 and error.value.param == "echo"
        assert "encoder" in error.value.message


def test_a_client_that_goes_away_mid_stream_is_cancelled_and_its_blocks_freed(served):
    engine = served["server"].engine
    _wait_idle(engine)
    cancelled = engine.stats["cancelled"]
    stream = _client(served).completions.create(model="p-tuning", prompt=_prompt(12, 6), max_tokens=40,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
    for received, _ in enumerate(stream, start=1):
        if received == 2:
            break
    stream.close()
    _wait_idle(engine)
    assert engine.stats["cancelled"] == cancelled + 1 and engine.kv_usage().blocks_in_use == 0


def test_an_adapter_removed_mid_stream_ends_that_stream_and_frees_its_blocks(served):
    import openai

    engine = served["server"].engine
    _wait_idle(engine)
    client = _client(served)
    engine.add_adapter("doomed", served["tenants"]["prefix"])
    stream = client.completions.create(model="doomed", prompt=_prompt(10, 5), max_tokens=40, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    received = 0
    with pytest.raises(openai.APIError) as error:
        for _ in stream:
            received += 1
            if received == 2:
                assert client.delete(served["server"].url + "/admin/adapters/doomed", cast_to=object)["deleted"]
    assert "removed" in str(error.value) and 2 <= received < 40
    _wait_idle(engine)
    assert engine.kv_usage().blocks_in_use == 0 and "doomed" not in engine.adapter_names()
    reply = client.completions.create(model="prefix", prompt=_prompt(10, 5), max_tokens=5, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert reply.choices[0].token_ids == _expected(served, "prefix", _prompt(10, 5), 5)[0]


# ----- the command line ------------------------------------------------------------------------------------------

def test_serve_command_with_the_built_in_t5(tmp_path):
    """``python -m fastpeft serve --model t5`` with a folder of seq2seq adapters (prefix tuning, prompt tuning), as a
    user starts it: each adapter's greedy reply to a text prompt equals PEFT's forward loop for it alone; echo gets
    400; SIGTERM drains and the process exits 0."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from fastpeft import tiny

    tenants = {}
    for name, config, seed in (("support", PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4), 5),
                               ("sales", PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=6), 6)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tenants[name] = get_peft_model(tiny.build_t5_model(), config).eval()
            with torch.no_grad():
                for parameter in tenants[name].parameters():
                    if parameter.requires_grad:
                        parameter.normal_(0, 1)
        tenants[name].save_pretrained(str(tmp_path / "adapters" / name))
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    for name in ("FASTPEFT_DEBUG", "FASTPEFT_BACKEND", "TRITON_INTERPRET", "FASTPEFT_ADMIN_TOKEN"):
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "-m", "fastpeft", "serve", "--model", "t5", "--adapters",
                                str(tmp_path / "adapters"), "--port", "0", "--default-temperature", "0",
                                "--kv-block-size", "8", "--kv-cache-tokens", "256"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def post(url, body):
        request = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.load(response)

    try:
        line = process.stdout.readline()
        assert "fastpeft-tiny-t5 + 2 adapter(s) on http://127.0.0.1:" in line, (
            line, process.stderr.read() if process.poll() is not None else "")
        url = line.split(" on ", 1)[1].split("/v1", 1)[0]
        ids = tiny.build_tokenizer()("Hello there")["input_ids"]
        for name in ("support", "sales"):
            reply = post(url, {"model": name, "prompt": "Hello there", "max_tokens": 8, "return_token_ids": True})
            assert reply["choices"][0]["token_ids"] == peft_alone_greedy(tenants[name], ids, 8)[0], name
        with pytest.raises(urllib.error.HTTPError) as error:
            post(url, {"model": "sales", "prompt": "Hello there", "echo": True})
        assert error.value.code == 400 and json.load(error.value)["error"]["param"] == "echo"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode == 0 and "fastpeft serve: stopped" in out, (out, err)
    finally:
        if process.poll() is None:
            process.terminate()
            process.communicate(timeout=TIMEOUT_S)


def test_load_base_loads_an_encoder_decoder_directory(tmp_path):
    from fastpeft import loading, tiny

    model = tiny.build_t5_model()
    model.save_pretrained(str(tmp_path))
    tiny.build_tokenizer().save_pretrained(str(tmp_path))
    loaded, _ = loading.load_base(str(tmp_path), "cpu")
    assert type(loaded).__name__ == "T5ForConditionalGeneration"
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                           model(input_ids=ids, decoder_input_ids=ids).logits)
