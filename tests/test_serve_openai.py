"""``fastpeft serve`` through the official ``openai`` Python client, as its users call it: completions, chat, streaming
(with ``stream_options``), and every refusal raised as the client's own exception class with the server's ``param``.

One server (127.0.0.1, ephemeral port) on the built-in model serves a prefix-tuning and a prompt-tuning tenant;
greedy replies are compared with PEFT's forward looped without a cache for that tenant alone. The client never
retries (``max_retries=0``), so a refusal reaches the test as it was answered.
"""

import threading
import time

import pytest
import torch

from fastpeft import tiny

openai = pytest.importorskip("openai")

TIMEOUT_S = 60
BASE = "fastpeft-tiny"
TOKEN = "admin-secret"


def _peft_model(kind, seed):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if kind == "prefix" else
              PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(tiny.build_model(), config).eval()
        with torch.no_grad():  # far from PEFT's small initialisation, so that the tenants' replies differ
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 1)
    return model


@pytest.fixture(scope="module")
def served():
    from fastpeft.serve import build_server

    tenants = {"tenant-p": _peft_model("prefix", 1), "tenant-q": _peft_model("prompt", 2)}
    server = build_server(tiny.build_model(), tiny.build_tokenizer(), tenants, base_name=BASE, admin_token=TOKEN,
                          max_batch=2, max_len=128, max_queue=1, max_tokens_limit=64,
                          default_temperature=0.0).start()
    yield {"server": server, "tenants": tenants}
    server.close()


def _client(served, api_key=TOKEN):
    return openai.OpenAI(base_url=served["server"].url + "/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT_S)


def _reference(model, prompt, max_tokens):
    from fastpeft.integration.reference_generate import generate_without_cache

    ids = tiny.build_tokenizer()(prompt, return_tensors="pt")["input_ids"]
    generated, _ = generate_without_cache(model, ids, max_new_tokens=max_tokens, eos_token_id=tiny.EOS_ID)
    new = generated[0, ids.shape[1]:].tolist()
    return new[:new.index(tiny.EOS_ID)] if tiny.EOS_ID in new else new


def _text(ids):
    return tiny.build_tokenizer().decode(ids, skip_special_tokens=True)


def test_models_list(served):
    assert [model.id for model in _client(served).models.list()] == [BASE, "tenant-p", "tenant-q"]


@pytest.mark.parametrize("tenant", ["tenant-p", "tenant-q"])
def test_completion_equals_peft_for_the_tenant(served, tenant):
    reply = _client(served).completions.create(model=tenant, prompt="Hello there", max_tokens=12, temperature=0,
                                               extra_body={"return_token_ids": True})
    expected = _reference(served["tenants"][tenant], "Hello there", 12)
    choice = reply.choices[0]
    assert choice.token_ids == expected and choice.text == _text(expected)
    assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")
    assert reply.object == "text_completion" and reply.model == tenant
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(expected)


def test_chat_completion_equals_peft_for_the_tenant(served):
    reply = _client(served).chat.completions.create(model="tenant-q", max_completion_tokens=10, temperature=0,
                                                    messages=[{"role": "user", "content": "Say hi"}])
    # the built-in tokenizer has no chat template: role lines, then "assistant:"
    expected = _reference(served["tenants"]["tenant-q"], "user: Say hi\nassistant:", 10)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == _text(expected)
    assert reply.usage.completion_tokens == len(expected)


def test_streams_equal_whole_replies_and_end_with_usage(served):
    client = _client(served)
    whole = client.completions.create(model="tenant-p", prompt="Stream me", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tenant-p", prompt="Stream me", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "Stream me"}]
    whole = client.chat.completions.create(model="tenant-q", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tenant-q", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_refusals_raise_the_clients_exception_classes(served):
    client = _client(served)
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="nobody", prompt="x")
    assert error.value.status_code == 404 and error.value.param == "model" and "tenant-p" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=BASE, prompt="x", max_tokens=65)
    assert error.value.param == "max_tokens" and error.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as error:  # pydantic's validation, answered 400 (never 422)
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], temperature=3)
    assert error.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=BASE, prompt="x" * 200, max_tokens=10)
    assert "context" in error.value.message
    with pytest.raises(openai.AuthenticationError) as error:
        _client(served, api_key="wrong").post(served["server"].url + "/admin/adapters",
                                              body={"name": "x", "path": "/x"}, cast_to=object)
    assert error.value.status_code == 401 and error.value.type == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        client.delete(served["server"].url + "/admin/adapters/nobody", cast_to=object)


def test_a_full_queue_raises_rate_limit_error(served):
    """max_batch 2 free slots + max_queue 1 waiting request are accepted while the engine admits nothing."""
    server = served["server"]
    engine = server.engine
    client = _client(served)
    engine.pause()
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(
        client.completions.create(model=BASE, prompt="q", max_tokens=2))) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while engine.waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as error:
            client.completions.create(model=BASE, prompt="q", max_tokens=2)
        assert error.value.status_code == 429 and error.value.type == "rate_limit_error"
    finally:
        engine.resume()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert len(replies) == 3 and all(reply.usage.completion_tokens >= 1 for reply in replies)


def test_an_adapter_removed_while_its_request_waits_raises_conflict_error(served):
    """The removed adapter's waiting request ends with 409; the admin calls go through the same client (its API key
    is the admin token)."""
    server = served["server"]
    engine = server.engine
    client = _client(served)
    engine.add_adapter("doomed", served["tenants"]["tenant-p"])
    engine.pause()
    raised = []

    def doomed_request():
        try:
            client.completions.create(model="doomed", prompt="x", max_tokens=4)
        except openai.APIStatusError as error:
            raised.append(error)

    thread = threading.Thread(target=doomed_request)
    try:
        thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while engine.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.delete(server.url + "/admin/adapters/doomed", cast_to=object)["deleted"] is True
        thread.join(TIMEOUT_S)
    finally:
        engine.resume()
    assert len(raised) == 1 and isinstance(raised[0], openai.ConflictError) and "removed" in raised[0].message
    assert "doomed" not in [model.id for model in client.models.list()]
