"""The Ray Serve application of ``fastpeft serve`` (``fastpeft.serve.ray_serve``), started locally on CPU, on loopback.

Two ``TenantReplica`` replicas of the built-in model (each running the engine in-process) behind the
``OpenAIIngress`` (the single-machine FastAPI app); three tenants' adapters in a folder, loaded on demand by Ray's
model multiplexing. Greedy responses are compared with PEFT's forward looped without a cache for that tenant alone
(never a ``generate``). Skipped where Ray Serve is not installed (``pip install "fastpeft[ray]"``: it is not among
the test extras, being large and optional).
"""

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import torch

from fastpeft import tiny

pytest.importorskip("ray.serve")

TIMEOUT_S = 120
ROUTING_UPDATE_S = 3  # time for Ray's router to learn which replica loaded an adapter
TENANTS = ("tenant-a", "tenant-b", "tenant-c")


def _peft_model(name):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5) if name == "tenant-b" else
              PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3 + TENANTS.index(name)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10 + TENANTS.index(name))
        model = get_peft_model(tiny.build_model(), config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 1)
    return model


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import ray
    from ray import serve

    from fastpeft.serve.ray_serve import build_app

    folder = tmp_path_factory.mktemp("adapters")
    models = {name: _peft_model(name) for name in TENANTS}
    for name, model in models.items():
        model.save_pretrained(str(folder / name))
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(folder), num_replicas=2, replica_cpus=0.5, max_batch=4, max_len=128,
                            default_temperature=0.0), name="fastpeft", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "models": models}
    finally:
        serve.shutdown()
        ray.shutdown()


def _call(app, method, path, body=None, raw=None):
    """(status, headers, parsed JSON or text) of one request to Ray's HTTP proxy."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(app["url"] + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, headers, text = response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        status, headers, text = error.code, error.headers, error.read().decode()
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text


def _reference(model, prompt, max_tokens):
    """The tenant's PEFT model (or the base model) on this prompt alone: greedy ids, ended at eos like the server."""
    from fastpeft.integration.reference_generate import generate_without_cache

    ids = tiny.build_tokenizer()(prompt, return_tensors="pt")["input_ids"]
    generated, _ = generate_without_cache(model, ids, max_new_tokens=max_tokens, eos_token_id=tiny.EOS_ID)
    new = generated[0, ids.shape[1]:].tolist()
    return new[:new.index(tiny.EOS_ID)] if tiny.EOS_ID in new else new


def _complete(app, model, prompt, max_tokens=5, **extra):
    return _call(app, "POST", "/v1/completions", dict(model=model, prompt=prompt, max_tokens=max_tokens,
                                                       temperature=0, return_token_ids=True, **extra))


def test_models_lists_the_base_model_and_every_adapter(app):
    status, _, body = _call(app, "GET", "/v1/models")
    assert status == 200
    assert [entry["id"] for entry in body["data"]] == ["fastpeft-tiny", *TENANTS]


def test_every_tenant_gets_peft_tokens_and_sticks_to_a_replica(app):
    """Each tenant's greedy completion equals its PEFT model's forward loop (the base model's: no adapter). Once a
    replica has loaded a tenant's adapter and Ray's router has heard of it (replicas report loaded model ids
    asynchronously: allow it a moment), the tenant's requests go to that replica."""
    base = tiny.build_model()
    prompts = ("Hello there", "Q: where?", "Say hi to me")
    for name in (*TENANTS, "fastpeft-tiny"):
        replicas = []
        for i, prompt in enumerate(prompts):
            status, headers, body = _complete(app, name, prompt)
            assert status == 200, body
            replicas.append(headers["x-fastpeft-replica"])
            model = base if name == "fastpeft-tiny" else app["models"][name]
            assert body["choices"][0]["token_ids"] == _reference(model, prompt, 5), (name, prompt)
            if i == 0:
                time.sleep(ROUTING_UPDATE_S)
        if name != "fastpeft-tiny":
            assert len(set(replicas[1:])) == 1, f"{name} was served by {replicas}"


def test_streamed_equals_whole(app):
    _, headers, whole = _complete(app, "tenant-b", "Say hi", max_tokens=6)
    request = urllib.request.Request(app["url"] + "/v1/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps(dict(model="tenant-b", prompt="Say hi", max_tokens=6,
                                                          temperature=0, stream=True)).encode())
    text = ""
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["x-fastpeft-replica"]  # the stream came back through a replica's handle generator
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[len("data: "):])["choices"][0]["text"]
    assert text == whole["choices"][0]["text"]


def test_bad_requests_are_answered_by_the_ingress(app):
    status, _, body = _complete(app, "nobody", "Hi")
    assert status == 404 and body["error"]["param"] == "model"
    assert all(name in body["error"]["message"] for name in TENANTS)
    status, _, body = _call(app, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, _, body = _complete(app, "tenant-a", "Hi", max_tokens=10_000)  # the replica's server refuses it
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, _, _ = _call(app, "GET", "/v1/nothing")
    assert status == 404


def test_the_ingress_is_the_single_machine_app(app):
    """The same FastAPI app: its OpenAPI schema, pydantic's 400s, /metrics counting by adapter, admin off (403)."""
    status, _, schema = _call(app, "GET", "/openapi.json")
    assert status == 200 and "/v1/chat/completions" in schema["paths"]
    status, _, body = _call(app, "POST", "/v1/completions", {"model": "tenant-c", "prompt": "Hi", "top_p": 0})
    assert status == 400 and body["error"]["param"] == "top_p"
    status, _, body = _call(app, "POST", "/v1/chat/completions", {"model": "tenant-c", "max_tokens": 4,
                                                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    status, _, text = _call(app, "GET", "/metrics")
    assert status == 200 and 'fastpeft_requests_total{adapter="tenant-c",status="200"}' in text
    status, _, body = _call(app, "POST", "/admin/adapters", {"name": "x", "path": "/x"})
    assert status == 403 and body["error"]["type"] == "permission_error"
