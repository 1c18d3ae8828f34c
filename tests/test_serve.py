"""``fastpeft serve`` on loopback: OpenAI-compatible endpoints (the FastAPI app on uvicorn) over the
continuous-batching engine, spoken to with the standard library's HTTP clients.

One server (127.0.0.1, ephemeral port) on a tiny Llama with the built-in byte tokenizer serves a prefix-tuning and
a prompt-tuning tenant. Greedy responses are compared with PEFT's forward looped without a cache for that tenant
alone (``generate_without_cache``; never a ``generate``), also when requests of both tenants with the same prompt
run in one batch and join it at different steps. Log-probabilities (``logprobs``, ``echo``, chat's ``top_logprobs``)
are compared with PEFT's forward on the same tokens; ``n``, seeds and the prompt shapes lm-evaluation-harness sends
(``[[ids], ...]``) are exercised through the official ``openai`` client. Every HTTP call has a timeout.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from fastpeft import tiny

from .serve_fixtures import EngineGate
from .serve_fixtures import peft_greedy as _reference
from .serve_fixtures import peft_tenant as _peft_model
from .serve_fixtures import tiny_llama as _model

TIMEOUT_S = 60
BASE = "tiny-llama"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastpeft.serve import adapter_dirs, build_server

    folder = tmp_path_factory.mktemp("adapters")
    tenants = {"tenant-a": _peft_model("prefix", 1), "tenant-b": _peft_model("prompt", 2),
               "tenant-c": _peft_model("prefix", 3)}
    for name, peft_model in tenants.items():
        peft_model.save_pretrained(str(folder / name))
    extra = folder.parent / "later"
    extra.mkdir()
    (folder / "tenant-c").rename(extra / "tenant-c")  # loaded later, through the admin endpoint
    server = build_server(_model(), tiny.build_tokenizer(), adapter_dirs(str(folder)), base_name=BASE,
                          admin_token=TOKEN, max_batch=4, max_len=256, max_queue=2, max_tokens_limit=200,
                          default_temperature=0.0).start()
    yield {"server": server, "tenants": tenants, "later": str(extra / "tenant-c")}
    server.close()


def _call(server, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON body) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def _stream(server, path, body):
    """The parsed SSE chunks of a streamed request, up to ``[DONE]``."""
    request = urllib.request.Request(server.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return chunks
            chunks.append(json.loads(line[len("data: "):]))
    raise AssertionError("the stream ended without [DONE]")


def _wait_idle(server, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engine = server.engine
        if engine.running == 0 and engine.waiting == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the engine did not become idle")


def test_models_lists_base_and_adapters(setup):
    status, body = _call(setup["server"], "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [BASE, "tenant-a", "tenant-b"]


def test_concurrent_tenants_same_prompt_each_equal_peft_alone(setup):
    """Same prompt, two tenants and the base model, plus requests that join while others decode: each response
    equals that tenant served alone by PEFT (isolation of prefixes and cached K/V)."""
    server, tenants = setup["server"], setup["tenants"]
    jobs = [("tenant-a", "hello world", 24), ("tenant-b", "hello world", 24), (BASE, "hello world", 24),
            ("tenant-a", "a longer prompt, joining later", 8), ("tenant-b", "hi", 12), ("tenant-a", "hello world", 5)]
    results = [None] * len(jobs)
    before = dict(server.engine.stats)

    def client(i, model, prompt, max_tokens):
        time.sleep(0.01 * i)
        results[i] = _call(server, "POST", "/v1/completions", {"model": model, "prompt": prompt,
                                                              "max_tokens": max_tokens, "return_token_ids": True})

    threads = [threading.Thread(target=client, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    stats = server.engine.stats
    assert stats["max_rows"] >= 2 and stats["prefills"] - before["prefills"] >= 2, stats
    for (model, prompt, max_tokens), (status, body) in zip(jobs, results):
        assert status == 200, body
        choice = body["choices"][0]
        expected = _reference(tenants.get(model), prompt, max_tokens)
        assert choice["token_ids"] == expected, (model, prompt)
        assert choice["text"] == tiny.build_tokenizer().decode(expected, skip_special_tokens=True)
        assert choice["finish_reason"] == ("length" if len(expected) == max_tokens else "stop")
        assert body["usage"]["completion_tokens"] == len(expected)
    a, b = results[0][1]["choices"][0]["token_ids"], results[1][1]["choices"][0]["token_ids"]
    assert a != b  # the two tenants really differ on this prompt


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_equals_whole_response(setup, chat):
    server = setup["server"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "tenant-b", "max_tokens": 16, "return_token_ids": True}
    body.update({"messages": [{"role": "user", "content": "say hi"}]} if chat else {"prompt": "say hi"})
    status, whole = _call(server, "POST", path, body)
    assert status == 200
    chunks = _stream(server, path, body)
    choices = [chunk["choices"][0] for chunk in chunks]
    if chat:
        assert whole["object"] == "chat.completion" and chunks[0]["object"] == "chat.completion.chunk"
        assert choices[0]["delta"]["role"] == "assistant"
        text = "".join(c["delta"].get("content", "") for c in choices)
        assert text == whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["text"] for c in choices)
        assert text == whole["choices"][0]["text"]
    assert [t for c in choices for t in c.get("token_ids", [])] == whole["choices"][0]["token_ids"]
    assert choices[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    if chat:  # the built-in tokenizer has no chat template: role lines, then "assistant:"
        expected = _reference(setup["tenants"]["tenant-b"], "user: say hi\nassistant:", 16)
        assert whole["choices"][0]["token_ids"] == expected


def _stop_case(setup):
    """A prompt/tenant whose greedy text holds a 2-character stop string (no U+FFFD) after its 3rd character."""
    tokens = _reference(setup["tenants"]["tenant-a"], "hello world", 24)
    text = tiny.build_tokenizer().decode(tokens, skip_special_tokens=True)
    for start in range(3, len(text) - 1):
        stop = text[start:start + 2]
        if "\ufffd" not in stop:
            return stop, text[:text.find(stop)]
    pytest.skip("no usable stop string in this model's output")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_cut_the_text_and_end_the_request(setup, stream):
    server = setup["server"]
    stop, expected = _stop_case(setup)
    body = {"model": "tenant-a", "prompt": "hello world", "max_tokens": 24, "stop": [stop, "never-seen"]}
    if stream:
        choices = [chunk["choices"][0] for chunk in _stream(server, "/v1/completions", body)]
        text, reason = "".join(c["text"] for c in choices), choices[-1]["finish_reason"]
    else:
        status, whole = _call(server, "POST", "/v1/completions", body)
        assert status == 200
        text, reason = whole["choices"][0]["text"], whole["choices"][0]["finish_reason"]
    assert (text, reason) == (expected, "stop")
    _wait_idle(server)


def test_repetition_penalty_is_transformers_processor(setup):
    """repetition_penalty goes through transformers' RepetitionPenaltyLogitsProcessor, per row, greedy: equal to
    PEFT's forward (no cache) with the same processor."""
    from transformers import RepetitionPenaltyLogitsProcessor

    server, peft_model = setup["server"], setup["tenants"]["tenant-b"]
    ids = tiny.build_tokenizer()("hello world", return_tensors="pt")["input_ids"]
    processor = RepetitionPenaltyLogitsProcessor(1.5)
    with torch.no_grad():
        for _ in range(12):
            scores = processor(ids, peft_model(input_ids=ids).logits[:, -1].float())
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    expected = ids[0, -12:].tolist()
    expected = expected[:expected.index(tiny.EOS_ID)] if tiny.EOS_ID in expected else expected
    status, body = _call(server, "POST", "/v1/completions", {"model": "tenant-b", "prompt": "hello world",
                                                             "max_tokens": 12, "repetition_penalty": 1.5,
                                                             "return_token_ids": True})
    assert status == 200 and body["choices"][0]["token_ids"] == expected
    assert expected != _reference(peft_model, "hello world", 12)


def test_bad_requests(setup):
    server = setup["server"]
    status, body = _call(server, "POST", "/v1/completions", {"model": "nobody", "prompt": "x"})
    assert status == 404 and "tenant-a" in body["error"]["message"] and BASE in body["error"]["message"]
    status, body = _call(server, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = _call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 201})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "x" * 250, "max_tokens": 10})
    assert status == 400 and "context" in body["error"]["message"]
    status, body = _call(server, "POST", "/v1/chat/completions", {"model": BASE, "messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "x", "temperature": -1})
    assert status == 400
    status, body = _call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "x", "stop": ["a"] * 5})
    assert status == 400 and body["error"]["param"] == "stop"
    status, _ = _call(server, "GET", "/v1/nothing")
    assert status == 404


def test_full_queue_answers_429(setup):
    server = setup["server"]
    engine = server.engine
    _wait_idle(server)
    engine.pause()
    results = []

    def client():
        results.append(_call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "q", "max_tokens": 2}))

    threads = []
    try:
        # max_batch 4 free rows + max_queue 2 waiting requests are accepted while paused; the next is refused.
        for _ in range(6):
            threads.append(threading.Thread(target=client))
            threads[-1].start()
        deadline = time.monotonic() + TIMEOUT_S
        while engine.waiting < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body = _call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "q", "max_tokens": 2})
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
    finally:
        engine.resume()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert [status for status, _ in results] == [200] * 6


def test_client_disconnect_mid_stream_frees_its_row(setup):
    server = setup["server"]
    engine = server.engine
    _wait_idle(server)
    cancelled = engine.stats["cancelled"]
    host, port = server.address
    body = json.dumps({"model": "tenant-a", "prompt": "go", "max_tokens": 200, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 2:
            received += sock.recv(4096)
    _wait_idle(server)
    assert engine.stats["cancelled"] == cancelled + 1
    status, _ = _call(server, "POST", "/v1/completions", {"model": "tenant-a", "prompt": "go", "max_tokens": 3})
    assert status == 200


def test_client_disconnect_while_queued_for_a_whole_response_drops_the_request(setup):
    server = setup["server"]
    engine = server.engine
    _wait_idle(server)
    cancelled, tokens = engine.stats["cancelled"], engine.stats["tokens"]
    host, port = server.address
    body = json.dumps({"model": "tenant-b", "prompt": "go", "max_tokens": 200, "ignore_eos": True}).encode()
    engine.pause()
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + TIMEOUT_S
            while engine.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
        time.sleep(1.0)  # the server hears http.disconnect on the ASGI receive channel and cancels
    finally:
        engine.resume()
    _wait_idle(server)
    assert engine.stats["cancelled"] == cancelled + 1 and engine.stats["tokens"] == tokens


def test_admin_adds_and_removes_adapters(setup):
    server, later = setup["server"], setup["later"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _ = _call(server, "POST", "/admin/adapters", {"name": "tenant-c", "path": later})
    assert status == 401
    status, _ = _call(server, "POST", "/admin/adapters", {"name": "tenant-c", "path": later},
                      headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body = _call(server, "POST", "/admin/adapters", {"name": "tenant-c", "path": later}, headers=auth)
    assert status == 201, body
    assert "tenant-c" in [m["id"] for m in _call(server, "GET", "/v1/models")[1]["data"]]
    status, body = _call(server, "POST", "/v1/completions", {"model": "tenant-c", "prompt": "hello world",
                                                             "max_tokens": 8, "return_token_ids": True})
    assert status == 200
    assert body["choices"][0]["token_ids"] == _reference(setup["tenants"]["tenant-c"], "hello world", 8)
    status, body = _call(server, "POST", "/admin/adapters", {"name": "bad", "path": str(later) + "-missing"},
                         headers=auth)
    assert status == 400
    status, _ = _call(server, "DELETE", "/admin/adapters/tenant-c", headers=auth)
    assert status == 200
    status, body = _call(server, "POST", "/v1/completions", {"model": "tenant-c", "prompt": "x"})
    assert status == 404
    status, _ = _call(server, "DELETE", "/admin/adapters/tenant-c", headers=auth)
    assert status == 404


def test_removing_an_adapter_ends_its_running_requests(setup):
    """A removed adapter's table entry is freed: its running request must end, never read a reused entry."""
    from fastpeft.serve import GenerationRequest

    server = setup["server"]
    engine = server.engine
    engine.add_adapter("temp", setup["tenants"]["tenant-a"])
    request = engine.submit(GenerationRequest(prompt_ids=[tiny.BOS_ID, 65, 66], adapter="temp", max_tokens=200,
                                                    ignore_eos=True))
    assert request.events.get(timeout=TIMEOUT_S)[0] == "token"
    engine.remove_adapter("temp")
    events = []
    while not events or events[-1][0] == "token":
        events.append(request.events.get(timeout=TIMEOUT_S))
    assert events[-1][0] == "error" and events[-1][1].reason == "adapter_removed" and "removed" in str(events[-1][1])
    _wait_idle(server)


def test_an_adapter_removed_mid_stream_ends_that_stream_alone_and_frees_its_blocks(setup):
    """Over HTTP: a tenant's stream is running when the admin removes its adapter. The stream gets an error event
    (409) before ``[DONE]``; another tenant's stream running beside it ends in full, equal to PEFT's; once idle the
    pool holds no block."""
    server, tenants = setup["server"], setup["tenants"]
    engine = server.engine
    tokenizer = tiny.build_tokenizer()
    _wait_idle(server)
    engine.add_adapter("doomed", tenants["tenant-a"])
    doomed_running = threading.Event()
    streams = {}

    def read(name, body):
        request = urllib.request.Request(server.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({**body, "stream": True, "return_token_ids": True}).encode())
        chunks = []
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            for line in response:
                line = line.decode().strip()
                if line == "data: [DONE]":
                    break
                if line.startswith("data: "):
                    chunks.append(json.loads(line[len("data: "):]))
                    if name == "doomed" and len(chunks) == 2:
                        doomed_running.set()
        streams[name] = chunks

    readers = [threading.Thread(target=read, args=("doomed", {"model": "doomed", "prompt": "go", "max_tokens": 200,
                                                              "ignore_eos": True})),
               threading.Thread(target=read, args=("beside", {"model": "tenant-b", "prompt": "hello world",
                                                              "max_tokens": 150, "ignore_eos": True}))]
    for reader in readers:
        reader.start()
    assert doomed_running.wait(TIMEOUT_S)
    status, _ = _call(server, "DELETE", "/admin/adapters/doomed", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    for reader in readers:
        reader.join(TIMEOUT_S)
    doomed = streams["doomed"]
    assert doomed[-1]["error"]["code"] == 409 and "removed" in doomed[-1]["error"]["message"]
    assert 2 <= sum(len(chunk["choices"][0].get("token_ids", [])) for chunk in doomed[:-1]) < 200
    beside = [t for chunk in streams["beside"] for t in chunk["choices"][0].get("token_ids", [])]
    assert beside == _greedy(tenants["tenant-b"], tokenizer("hello world")["input_ids"], 150)
    _wait_idle(server)
    assert engine.kv_usage().blocks_in_use == 0 and "doomed" not in engine.adapter_names()


def test_joining_rows_prefill_together_and_decode_with_running_ones(setup):
    """Engine level: requests of different lengths and adapters admitted in one prefill (right-padded), joining rows
    that already decode, each equal to its tenant alone; a seeded sampled request repeats itself."""
    from fastpeft.serve import GenerationRequest

    server, tenants = setup["server"], setup["tenants"]
    engine = server.engine
    tokenizer = tiny.build_tokenizer()
    _wait_idle(server)
    prefills = engine.stats["prefills"]
    first = engine.submit(GenerationRequest(prompt_ids=tokenizer("hello world")["input_ids"], adapter="tenant-b",
                                            max_tokens=20))
    assert first.events.get(timeout=TIMEOUT_S)[0] == "token"
    engine.pause()
    jobs = [("tenant-a", "x"), (None, "a much longer prompt than the others"), ("tenant-b", "hello world")]
    requests = [engine.submit(GenerationRequest(prompt_ids=tokenizer(prompt)["input_ids"], adapter=name,
                                                max_tokens=10)) for name, prompt in jobs]
    engine.resume()
    _wait_idle(server)
    assert engine.stats["prefills"] - prefills == 2  # the first request alone, then the three together
    for (name, prompt), request in zip([("tenant-b", "hello world")] + jobs, [first] + requests):
        assert request.generated == _reference(tenants.get(name), prompt, request.max_tokens), (name, prompt)
    sampled = [engine.submit(GenerationRequest(prompt_ids=tokenizer("hi")["input_ids"], adapter="tenant-a",
                                               max_tokens=12, temperature=0.9, top_p=0.95, seed=7,
                                               ignore_eos=True)) for _ in range(2)]
    _wait_idle(server)
    assert sampled[0].generated == sampled[1].generated and len(sampled[0].generated) == 12
    # the same draws as PEFT's forward sampled by transformers' warpers from a generator with the same seed
    from fastpeft.integration.reference_generate import generate_without_cache

    ids = tokenizer("hi", return_tensors="pt")["input_ids"]
    expected, _ = generate_without_cache(tenants["tenant-a"], ids, max_new_tokens=12, do_sample=True,
                                         temperature=0.9, top_k=0, top_p=0.95,
                                         generator=torch.Generator().manual_seed(7))
    assert sampled[0].generated == expected[0, ids.shape[1]:].tolist()


def test_a_row_whose_neighbour_ends_keeps_decoding_and_the_ended_rows_blocks_go_back(setup):
    """Engine level: two requests admitted in one step; one ends at its first token, the other keeps decoding from its
    own blocks (its tokens equal its tenant alone). Right after that step, the pool holds exactly the blocks of the
    running one's tokens (the ended one's went back); once idle, none."""
    from fastpeft.serve import GenerationRequest

    server, tenants = setup["server"], setup["tenants"]
    engine = server.engine
    tokenizer = tiny.build_tokenizer()
    _wait_idle(server)
    before = EngineGate(engine).wait()
    short = engine.submit(GenerationRequest(prompt_ids=tokenizer("short")["input_ids"], adapter="tenant-a",
                                            max_tokens=1))
    long_prompt = tokenizer("a longer prompt here")["input_ids"]
    long = engine.submit(GenerationRequest(prompt_ids=long_prompt, adapter="tenant-b", max_tokens=12,
                                           ignore_eos=True))
    after_one_step = EngineGate(engine)
    before.release()
    after_one_step.wait()
    try:   # one step: both prefilled together, the short one ended, the long one decoded its second token
        assert short.finish_reason == "length" and len(long.generated) == 2 and engine.running == 1
        block = engine.pool.block_size
        assert engine.kv_usage().blocks_in_use == -(-(len(long_prompt) + 1) // block)
    finally:
        after_one_step.release()
    _wait_idle(server)
    assert short.generated == _reference(tenants["tenant-a"], "short", 1)
    from fastpeft.integration.reference_generate import generate_without_cache

    ids = torch.tensor([long_prompt])
    expected, _ = generate_without_cache(tenants["tenant-b"], ids, max_new_tokens=12)
    assert long.generated == expected[0, ids.shape[1]:].tolist()
    assert engine.kv_usage().blocks_in_use == 0


# ----- the HTTP layer: body limit, keep-alive, schema, validation, metrics, drain ----------------------------------

def test_a_body_over_the_limit_gets_413_even_when_the_client_sends_it_all_first(setup):
    """urllib writes the whole 4 MiB body before it reads anything (and asks to close the connection): the server
    must read and drop the body, then answer 413 in OpenAI's shape, not reset the connection."""
    server = setup["server"]
    status, body = _call(server, "POST", "/v1/completions", raw=b"x" * (4 << 20))
    assert status == 413 and body["error"]["code"] == 413 and "exceeds" in body["error"]["message"]
    connection = http.client.HTTPConnection(*server.address, timeout=TIMEOUT_S)
    try:  # a chunked body (no Content-Length) is cut when its bytes pass the limit
        connection.request("POST", "/v1/completions", body=iter([b"x" * (1 << 16)] * 40), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and json.load(response)["error"]["code"] == 413
    finally:
        connection.close()
    assert _call(server, "GET", "/v1/models")[0] == 200


def test_http11_keep_alive_serves_several_requests_on_one_connection(setup):
    server = setup["server"]
    connection = http.client.HTTPConnection(*server.address, timeout=TIMEOUT_S)
    try:
        sockets = []
        for stream in (False, True, False):
            connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                               body=json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 3, "stream": stream}))
            response = connection.getresponse()
            payload = response.read()
            assert response.status == 200 and response.version == 11
            assert payload.endswith(b"data: [DONE]\n\n") if stream else json.loads(payload)["choices"]
            sockets.append(connection.sock)  # http.client opens a new socket when the server closed the last one
        assert sockets[0] is not None and all(sock is sockets[0] for sock in sockets)
    finally:
        connection.close()


def test_openapi_schema_describes_the_routes_and_models(setup):
    status, schema = _call(setup["server"], "GET", "/openapi.json")
    assert status == 200 and schema["openapi"].startswith("3.")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/admin/adapters"} <= set(
        schema["paths"])
    request = schema["components"]["schemas"]["CompletionRequest"]
    assert {"model", "prompt"} <= set(request["required"])
    assert {"max_tokens", "temperature", "stop", "stream", "top_k", "return_token_ids"} <= set(request["properties"])
    error = schema["paths"]["/v1/completions"]["post"]["responses"]["429"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/ErrorResponse")


def test_validation_errors_are_openai_400s_naming_the_field(setup):
    """pydantic's 422 becomes OpenAI's 400; ``param`` is the top-level field at fault."""
    server = setup["server"]
    cases = [({"model": BASE, "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
             ({"model": BASE, "prompt": "x", "max_tokens": True}, "max_tokens"),
             ({"model": BASE, "prompt": []}, "prompt"),
             ({"model": BASE, "prompt": [1, "a"]}, "prompt"),
             ({"model": BASE, "prompt": [tiny.VOCAB_SIZE]}, "prompt"),
             ({"model": BASE, "prompt": "x", "n": 0}, "n"),
             ({"model": BASE, "prompt": "x", "top_p": 0}, "top_p"),
             ({"model": BASE, "prompt": "x", "seed": 2 ** 64}, "seed"),
             ({"model": BASE, "prompt": "x", "temperature": 1, "repetition_penalty": 1e-300}, "repetition_penalty"),
             ({"prompt": "x"}, "model")]
    for body, param in cases:
        status, answer = _call(server, "POST", "/v1/completions", body)
        assert status == 400 and answer["error"]["param"] == param, (body, answer)
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["code"] == 400
    status, answer = _call(server, "POST", "/v1/chat/completions",
                           {"model": BASE, "messages": [{"role": "user", "content": 3}]})
    assert status == 400 and answer["error"]["param"] == "messages"
    status, answer = _call(server, "POST", "/v1/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in answer["error"]["message"]
    status, answer = _call(server, "GET", "/v1/completions")
    assert status == 405 and answer["error"]["code"] == 405


def test_a_temperature_that_underflows_float32_decodes_greedily(setup):
    """5e-324 is a valid temperature for the schema; dividing float32 logits by it would give NaN probabilities (and
    a failed step for every running request): below 1e-5 the server decodes greedily, as vLLM does."""
    body = {"model": "tenant-a", "prompt": "hello world", "max_tokens": 8, "return_token_ids": True}
    status, tiny_temperature = _call(setup["server"], "POST", "/v1/completions", {**body, "temperature": 5e-324})
    assert status == 200
    assert tiny_temperature["choices"][0]["token_ids"] == _reference(setup["tenants"]["tenant-a"], "hello world", 8)


def test_a_json_body_is_read_whatever_its_content_type(setup):
    """``curl -d`` labels its body application/x-www-form-urlencoded."""
    status, body = _call(setup["server"], "POST", "/v1/completions",
                         {"model": BASE, "prompt": "hi", "max_tokens": 2},
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def _metrics(server):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "/metrics", timeout=TIMEOUT_S) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_requests_tokens_latencies_and_kv_use(setup):
    from fastpeft.serve import GenerationRequest

    server = setup["server"]
    engine = server.engine
    _wait_idle(server)
    before = _metrics(server)
    status, body = _call(server, "POST", "/v1/completions", {"model": "tenant-a", "prompt": "hello", "max_tokens": 6,
                                                             "ignore_eos": True})
    assert status == 200
    assert _call(server, "POST", "/v1/completions", {"model": "nobody", "prompt": "x"})[0] == 404
    after = _metrics(server)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("fastpeft_requests_total", adapter="tenant-a", status="200") == 1
    assert grew("fastpeft_requests_total", adapter="", status="404") == 1
    assert grew("fastpeft_prompt_tokens_total", adapter="tenant-a") == body["usage"]["prompt_tokens"]
    assert grew("fastpeft_completion_tokens_total", adapter="tenant-a") == 6
    assert grew("fastpeft_time_to_first_token_seconds_count") == 1
    assert grew("fastpeft_inter_token_latency_seconds_count") == 5
    pool = engine.pool
    assert after[("fastpeft_kv_bytes_total", ())] == pool.nbytes == pool.num_blocks * pool.bytes_per_block
    assert after[("fastpeft_kv_blocks_total", ())] == pool.num_blocks
    assert after[("fastpeft_kv_block_tokens", ())] == pool.block_size
    assert after[("fastpeft_kv_blocks_in_use", ())] == 0 and after[("fastpeft_requests_running", ())] == 0
    # a running request holds the blocks its tokens fill, and their bytes; queued ones show as waiting
    prompt = [tiny.BOS_ID, 65]
    running = engine.submit(GenerationRequest(prompt_ids=prompt, adapter="tenant-b", max_tokens=200,
                                              ignore_eos=True))
    assert running.events.get(timeout=TIMEOUT_S)[0] == "token"
    gate = EngineGate(engine).wait()   # the engine stands still between two steps while the metrics are read
    engine.pause()
    try:
        queued = engine.submit(GenerationRequest(prompt_ids=[tiny.BOS_ID, 66], max_tokens=2))
        during = _metrics(server)
        # every token in the pool but the last one picked (fed at the next step)
        held_blocks = -(-(len(prompt) + len(running.generated) - 1) // pool.block_size)
    finally:
        running.cancel()
        gate.release()
        engine.resume()
    _wait_idle(server)
    assert queued.finish_reason is not None
    assert during[("fastpeft_requests_running", ())] == 1 and during[("fastpeft_requests_waiting", ())] == 1
    assert during[("fastpeft_kv_blocks_in_use", ())] == held_blocks >= 1
    assert during[("fastpeft_kv_bytes_in_use", ())] == held_blocks * pool.bytes_per_block


def test_drain_finishes_requests_in_flight_and_refuses_new_ones_with_503():
    """What SIGTERM starts (``server.drain()``): requests in flight, queued or streaming, finish in full; a new one
    gets 503 in OpenAI's shape; once none is in flight the server stops listening by itself."""
    from fastpeft.serve import build_server

    server = build_server(_model(), tiny.build_tokenizer(), {}, base_name=BASE, max_batch=2, max_len=128,
                          default_temperature=0.0).start()
    engine = server.engine
    try:
        status, answer = _call(server, "POST", "/admin/adapters", {"name": "x", "path": "/x"})
        assert status == 403 and answer["error"]["type"] == "permission_error"  # started without an admin token
        engine.pause()
        results = {}
        body = {"model": BASE, "prompt": "drain", "max_tokens": 12, "ignore_eos": True, "return_token_ids": True}
        clients = [threading.Thread(target=lambda: results.update(whole=_call(server, "POST", "/v1/completions",
                                                                               body))),
                   threading.Thread(target=lambda: results.update(stream=_stream(server, "/v1/completions", body)))]
        for client in clients:
            client.start()
        deadline = time.monotonic() + TIMEOUT_S
        while engine.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.drain()
        while _call(server, "GET", "/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.02)  # the drain begins at uvicorn's next tick (0.1 s)
        status, refused = _call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "late"})
        assert status == 503 and refused["error"]["code"] == 503
        assert refused["error"]["type"] == "service_unavailable_error"
        engine.resume()
        for client in clients:
            client.join(TIMEOUT_S)
        status, whole = results["whole"]
        assert status == 200 and len(whole["choices"][0]["token_ids"]) == 12
        streamed = [t for chunk in results["stream"] for t in chunk["choices"][0].get("token_ids", [])]
        assert streamed == whole["choices"][0]["token_ids"]
        assert server.wait(TIMEOUT_S)  # stopped by itself once idle
        with pytest.raises(OSError):
            socket.create_connection(server.address, timeout=TIMEOUT_S).close()
    finally:
        server.close()


def test_a_drain_past_its_timeout_ends_what_is_left_with_503():
    from fastpeft.serve import build_server

    server = build_server(_model(), tiny.build_tokenizer(), {}, base_name=BASE, max_batch=1, max_len=64,
                          default_temperature=0.0, drain_timeout=0.3).start()
    engine = server.engine
    try:
        engine.pause()  # the request below waits for ever
        result = []
        client = threading.Thread(target=lambda: result.append(
            _call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "stuck", "max_tokens": 4})))
        client.start()
        deadline = time.monotonic() + TIMEOUT_S
        while engine.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.drain()
        client.join(TIMEOUT_S)
        status, body = result[0]
        assert status == 503 and "shutting down" in body["error"]["message"]
        assert server.wait(TIMEOUT_S)
    finally:
        server.close()
def _client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def _peft_logprobs(peft_model, ids):
    """``[len(ids) - 1, vocab]``: the float32 log-probabilities PEFT's forward (the bare model for None) gives at
    each position of ``ids`` but the last, scoring the next token. Prompt tuning's forward returns the virtual
    tokens' logits first: sliced off."""
    with torch.no_grad():
        logits = (peft_model if peft_model is not None else _model())(input_ids=torch.tensor([ids])).logits[0]
    return logits[logits.shape[0] - len(ids):-1].float().log_softmax(-1)


def _greedy(peft_model, ids, max_tokens):
    """PEFT's greedy tokens after ``ids`` (no cache, generated past end-of-sequence)."""
    from fastpeft.integration.reference_generate import generate_without_cache

    generated, _ = generate_without_cache(peft_model if peft_model is not None else _model(), torch.tensor([ids]),
                                          max_new_tokens=max_tokens)
    return generated[0, len(ids):].tolist()


@pytest.mark.parametrize("model", ["tenant-a", "tenant-b", BASE], ids=["prefix", "prompt", "base"])
def test_completion_logprobs_with_echo_equal_peft_forward(setup, model):
    """``echo`` + ``logprobs``: the prompt's tokens (first None) then the generated ones, each with the float32
    log-probability PEFT's forward gives it and the top-3 alternatives, in OpenAI's legacy shape."""
    server, peft_model = setup["server"], setup["tenants"].get(model)
    tokenizer = tiny.build_tokenizer()
    prompt_ids = tokenizer("hello world")["input_ids"]
    response = _client(server).completions.create(
        model=model, prompt=[prompt_ids], max_tokens=6, echo=True, logprobs=3, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = response.choices[0]
    assert choice.token_ids == _greedy(peft_model, prompt_ids, 6)
    ids = prompt_ids + choice.token_ids
    expected = _peft_logprobs(peft_model, ids)
    logprobs = choice.logprobs
    assert choice.text == "hello world" + tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids] and logprobs.tokens[0] == "<s>"
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(ids))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:]),
                               expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)], rtol=1e-5, atol=1e-6)
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        values, top_ids = expected[position].topk(3)
        texts = [tokenizer.decode([t]) for t in top_ids.tolist()]
        if len(set(texts)) == 3:  # tokens that decode alike (U+FFFD) share one key
            assert list(top)[:3] == texts
        torch.testing.assert_close(max(top.values()), values[0].item(), rtol=1e-5, atol=1e-6)
        assert logprobs.tokens[position + 1] in top  # the chosen token is always there (up to k + 1 entries)
    for position in range(len(prompt_ids), len(ids)):  # greedy: each generated token is the most likely one
        assert logprobs.token_logprobs[position] == max(logprobs.top_logprobs[position].values())


def test_lm_eval_shapes_several_prompts_and_max_tokens_zero(setup):
    """lm-evaluation-harness's requests: ``"prompt": [[ids], [ids], ...]`` (one choice per prompt, in order),
    ``echo`` with ``max_tokens`` 0 (the prompt scored, nothing generated) or 1 (one token more, which lm-eval drops);
    strings and a flat id list are prompts too."""
    server, tenants = setup["server"], setup["tenants"]
    tokenizer = tiny.build_tokenizer()
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("The cat", "a b c d e f", "Z")]
    client = _client(server)
    response = client.completions.create(model="tenant-b", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == sum(map(len, prompts))
    for ids, choice in zip(prompts, response.choices):
        assert choice.finish_reason == "length" and choice.text == tokenizer.decode(ids)
        assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[0] is None
        expected = _peft_logprobs(tenants["tenant-b"], ids)
        torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:], dtype=torch.float32),
                                   expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)], rtol=1e-5, atol=1e-6)
    scored = client.completions.create(model="tenant-b", prompt=prompts[:2], max_tokens=1, echo=True, logprobs=1,
                                       temperature=0, extra_body={"ignore_eos": True})
    for ids, zero, one in zip(prompts, response.choices, scored.choices):
        assert len(one.logprobs.token_logprobs) == len(ids) + 1
        assert one.logprobs.token_logprobs[:-1] == zero.logprobs.token_logprobs
    by_text = client.completions.create(model="tenant-a", prompt=["hello world", "hi"], max_tokens=5,
                                        temperature=0, extra_body={"return_token_ids": True})
    flat = client.completions.create(model="tenant-a", prompt=tokenizer("hi")["input_ids"], max_tokens=5,
                                     temperature=0, extra_body={"return_token_ids": True})
    assert [choice.token_ids for choice in by_text.choices] == [
        _reference(tenants["tenant-a"], "hello world", 5), _reference(tenants["tenant-a"], "hi", 5)]
    assert flat.choices[0].token_ids == by_text.choices[1].token_ids and flat.choices[0].logprobs is None


def test_n_continuations_share_one_prefill_and_repeat_with_a_seed(setup):
    """``n`` continuations of each prompt are numbered prompt-major and prefilled once per prompt; sampled with a
    seed, continuation j is what the request alone gives with ``seed + j``, equal to PEFT's forward sampled from a
    generator with that seed, and the whole request repeats itself. Greedy continuations all equal PEFT's."""
    from fastpeft.integration.reference_generate import generate_without_cache

    server, tenants = setup["server"], setup["tenants"]
    engine = server.engine
    client = _client(server)
    tokenizer = tiny.build_tokenizer()
    _wait_idle(server)
    prefilled = engine.stats["prefill_tokens"]
    sampled = dict(model="tenant-a", prompt="hi there", max_tokens=8, temperature=0.9, top_p=0.95, seed=5,
                   extra_body={"return_token_ids": True, "ignore_eos": True})
    first = client.completions.create(n=3, **sampled)
    assert engine.stats["prefill_tokens"] - prefilled == len(tokenizer("hi there")["input_ids"])
    continuations = [choice.token_ids for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2] and len(set(map(tuple, continuations))) == 3
    assert [choice.token_ids for choice in client.completions.create(n=3, **sampled).choices] == continuations
    for j in range(3):
        alone = client.completions.create(n=1, **{**sampled, "seed": 5 + j})
        assert alone.choices[0].token_ids == continuations[j]
    ids = tokenizer("hi there", return_tensors="pt")["input_ids"]
    expected, _ = generate_without_cache(tenants["tenant-a"], ids, max_new_tokens=8, do_sample=True, temperature=0.9,
                                         top_k=0, top_p=0.95, generator=torch.Generator().manual_seed(7))
    assert continuations[2] == expected[0, ids.shape[1]:].tolist()

    greedy = client.completions.create(model="tenant-b", prompt=["hello world", "hi"], n=2, max_tokens=6,
                                       temperature=0, extra_body={"return_token_ids": True})
    assert [choice.index for choice in greedy.choices] == [0, 1, 2, 3]
    assert [choice.token_ids for choice in greedy.choices] == [_reference(tenants["tenant-b"], prompt, 6)
                                                                for prompt in ("hello world", "hello world", "hi",
                                                                               "hi")]
    _wait_idle(server)


def test_chat_logprobs_equal_peft_forward(setup):
    """Chat's ``logprobs: true`` with ``top_logprobs``: per generated token its log-probability under PEFT's forward
    and exactly k alternatives, the first the token itself (greedy); ``n`` choices alike."""
    server, peft_model = setup["server"], setup["tenants"]["tenant-b"]
    response = _client(server).chat.completions.create(
        model="tenant-b", messages=[{"role": "user", "content": "say hi"}], max_tokens=6, temperature=0, n=2,
        logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True, "ignore_eos": True})
    prompt_ids = tiny.build_tokenizer()("user: say hi\nassistant:")["input_ids"]
    first, second = response.choices
    assert first.token_ids == second.token_ids == _greedy(peft_model, prompt_ids, 6)
    expected = _peft_logprobs(peft_model, prompt_ids + first.token_ids)[len(prompt_ids) - 1:]
    content = first.logprobs.content
    assert len(content) == 6 and [len(item.top_logprobs) for item in content] == [2] * 6
    torch.testing.assert_close(torch.tensor([item.logprob for item in content]),
                               expected[torch.arange(6), torch.tensor(first.token_ids)], rtol=1e-5, atol=1e-6)
    for position, item in enumerate(content):
        torch.testing.assert_close(torch.tensor([alt.logprob for alt in item.top_logprobs]),
                                   expected[position].topk(2).values, rtol=1e-5, atol=1e-6)
        assert item.top_logprobs[0].logprob == item.logprob and item.bytes == list(item.token.encode())
    assert second.logprobs.content == content


def test_stream_with_logprobs_echo_and_n_equals_whole_response(setup):
    server = setup["server"]
    client = _client(server)
    body = dict(model="tenant-a", prompt=["hello world", "hi"], max_tokens=8, n=2, echo=True, logprobs=2,
                temperature=0)
    whole = client.completions.create(**body)
    pieces = {}
    for chunk in client.completions.create(stream=True, **body):
        for choice in chunk.choices:
            piece = pieces.setdefault(choice.index, {"text": "", "tokens": [], "token_logprobs": [],
                                                     "top_logprobs": [], "text_offset": []})
            piece["text"] += choice.text
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                piece[key] += getattr(choice.logprobs, key)
            if choice.finish_reason is not None:
                piece["finish_reason"] = choice.finish_reason
    assert sorted(pieces) == [0, 1, 2, 3]
    for choice in whole.choices:
        assert pieces[choice.index] == {"text": choice.text, "finish_reason": choice.finish_reason,
                                        **choice.logprobs.model_dump()}


def test_the_end_of_sequence_token_keeps_its_logprob(setup):
    """A request ended by an end-of-sequence token lists that token last in its completion log-probabilities
    (vLLM's shape; lm-evaluation-harness drops the last entry of ``echo`` + ``max_tokens: 1``), not in its text or
    token ids. Served here with the base model's first greedy token after the prompt as its end-of-sequence id."""
    from fastpeft.bank import AdapterBank
    from fastpeft.serve import Engine
    from fastpeft.serve.app import ServeConfig, create_app
    from fastpeft.serve.engine_client import EngineClient
    from fastpeft.serve.server import Server

    tokenizer = tiny.build_tokenizer()
    prompt_ids = tokenizer("hello world")["input_ids"]
    end = _greedy(None, prompt_ids, 1)[0]
    client = EngineClient(Engine(AdapterBank(_model()), max_batch=2, max_len=64, eos_token_ids=[end]).start())
    server = Server(create_app(ServeConfig(tokenizer, BASE, default_temperature=0.0), client), client).start()
    try:
        response = _client(server).completions.create(model=BASE, prompt=[prompt_ids], max_tokens=1, echo=True,
                                                      logprobs=1, extra_body={"return_token_ids": True})
    finally:
        server.close()
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.token_ids == [] and choice.text == "hello world"
    assert len(choice.logprobs.tokens) == len(prompt_ids) + 1 and choice.logprobs.tokens[-1] == tokenizer.decode([end])
    expected = _peft_logprobs(None, prompt_ids + [end])[-1, end].item()
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(expected, rel=1e-5)
    assert choice.logprobs.token_logprobs[-1] == max(choice.logprobs.top_logprobs[-1].values())


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"echo": "yes"}, "echo"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 5}, "n"),  # more than the server's 4 rows
    ("/v1/completions", {"n": 1.5}, "n"),
    ("/v1/completions", {"n": 2, "best_of": 3}, "best_of"),
    ("/v1/completions", {"seed": 1 << 63}, "seed"),
    ("/v1/completions", {"seed": "7"}, "seed"),
    ("/v1/completions", {"max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[65, "a"]]}, "prompt"),
    ("/v1/completions", {"prompt": [[65], 66]}, "prompt"),
    ("/v1/completions", {"prompt": [[65, 10 ** 6]]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 4, "n": 2}, "n"),  # 8 choices > 4 rows + 2 queue places
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
])
def test_bad_logprob_n_and_prompt_values_answer_400_naming_the_param(setup, path, extra, param):
    server = setup["server"]
    body = {"model": "tenant-a", **({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else
                                    {"prompt": "x"}), **extra}
    status, response = _call(server, "POST", path, body)
    assert status == 400 and response["error"]["param"] == param, response
    assert response["error"]["type"] == "invalid_request_error"
    assert _call(server, "GET", "/health")[0] == 200


def test_engine_groups_of_continuations_are_checked():
    """``continuations`` copies a request with seeds ``seed + i``; ``Engine.submit`` refuses a group that does not
    share its prompt and adapter, or needs more rows than ``max_batch``, and out-of-range logprob counts."""
    from fastpeft.bank import AdapterBank
    from fastpeft.serve import Engine, GenerationRequest
    from fastpeft.serve.engine import MAX_LOGPROBS, continuations

    request = GenerationRequest(prompt_ids=[1, 2], seed=9, temperature=1.0)
    group = continuations(request, 3)
    assert group[0] is request and [r.seed for r in group] == [9, 10, 11]
    assert len({id(r.events) for r in group}) == 3 and len({id(r.generated) for r in group}) == 3
    assert [r.seed for r in continuations(GenerationRequest(prompt_ids=[1]), 2)] == [None, None]
    with pytest.raises(ValueError, match="n must be"):
        continuations(request, 0)
    engine = Engine(AdapterBank(_model()), max_batch=2, max_len=32)  # not started: submit only queues
    with pytest.raises(ValueError, match="share their prompt_ids"):
        engine.submit([GenerationRequest(prompt_ids=[1, 2]), GenerationRequest(prompt_ids=[1, 3])])
    with pytest.raises(ValueError, match="max_batch"):
        engine.submit(continuations(GenerationRequest(prompt_ids=[1, 2]), 3))
    with pytest.raises(ValueError, match="logprobs"):
        engine.submit(GenerationRequest(prompt_ids=[1, 2], logprobs=MAX_LOGPROBS + 1))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.submit(GenerationRequest(prompt_ids=[1, 2], prompt_logprobs=-1))
    with pytest.raises(ValueError, match="seed"):
        engine.submit(GenerationRequest(prompt_ids=[1, 2], seed=1 << 64))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(GenerationRequest(prompt_ids=[1, 2], max_tokens=-1))
    engine.submit(continuations(GenerationRequest(prompt_ids=[1, 2]), 2))
    assert engine.waiting == 2


def test_serve_command_help(capsys):
    from fastpeft import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastpeft serve") and "--adapters" in out and "--admin-token" in out
    assert "--kv-cache-tokens" in out and "--kv-cache-memory" in out and "--max-prefill-tokens" in out


def test_serve_command_refuses_bad_arguments(tmp_path, capsys):
    from fastpeft import cli

    assert cli.main(["serve", "--adapters", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["serve", "--max-batch", "0"]) == 2
    assert cli.main(["serve", "--kv-cache-tokens", "64", "--kv-cache-memory", "1MiB"]) == 2
    assert "at most one of --kv-cache-tokens and --kv-cache-memory" in capsys.readouterr().err
    assert cli.main(["serve", "--kv-cache-memory", "lots"]) == 2
    assert "expected a size" in capsys.readouterr().err
    assert cli.main(["serve", "--max-prefill-tokens", "0"]) == 2


def test_serve_command_reads_kv_cache_sizes():
    from fastpeft.cli.serve import parse_size

    assert [parse_size(text) for text in ("4096", "512MiB", "2GiB", "1.5GB", "64k", " 3 mb ")] == [
        4096, 512 << 20, 2 << 30, 1_500_000_000, 64 << 10, 3_000_000]


def test_serve_command_end_to_end(tmp_path):
    """``python -m fastpeft serve`` on the built-in model with an adapter folder, as a user starts it; SIGTERM then
    drains it: the stream in flight ends in full, and the process exits 0."""
    from peft import PrefixTuningConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        get_peft_model(tiny.build_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)) \
            .save_pretrained(str(tmp_path / "adapters" / "support"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", FASTPEFT_ADMIN_TOKEN="t")
    for name in ("FASTPEFT_DEBUG", "FASTPEFT_BACKEND", "TRITON_INTERPRET"):
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "-m", "fastpeft", "serve", "--adapters", str(tmp_path / "adapters"),
                                "--port", "0", "--default-temperature", "0", "--max-tokens-limit", "200",
                                "--kv-block-size", "8", "--kv-cache-memory", "2MiB", "--max-prefill-tokens", "4"],
                               cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "on http://127.0.0.1:" in line and "admin endpoints on" in line, (line, process.stderr.read()
                                                                                 if process.poll() is not None else "")
        url = line.split(" on ", 1)[1].split("/v1", 1)[0]
        with urllib.request.urlopen(url + "/v1/models", timeout=TIMEOUT_S) as response:
            assert [m["id"] for m in json.load(response)["data"]] == ["fastpeft-tiny", "support"]
        request = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "support", "prompt": "Hi", "max_tokens": 4,
                                                          "ignore_eos": True}).encode())
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body = json.load(response)
        assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
        request = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "support", "prompt": "Hi", "max_tokens": 200,
                                                          "ignore_eos": True, "stream": True,
                                                          "return_token_ids": True}).encode())
        chunks = []
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    chunks.append(json.loads(line[len(b"data: "):]))
                    if len(chunks) == 1:
                        process.send_signal(signal.SIGTERM)  # 199 tokens still to come
                elif line.startswith(b"data: [DONE]"):
                    break
        assert sum(len(chunk["choices"][0]["token_ids"]) for chunk in chunks) == 200
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        out, err = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode == 0 and "fastpeft serve: stopped" in out, (out, err)
    finally:
        if process.poll() is None:
            process.terminate()
            process.communicate(timeout=TIMEOUT_S)
