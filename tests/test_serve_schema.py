"""schemathesis against the app's own OpenAPI schema (``/openapi.json`` of a live server on loopback): no generated
request, valid for the schema or deliberately not, gets a 5xx.

Each operation gets ``EXAMPLES`` requests (15 by default) drawn by hypothesis (derandomized: CI sees the same ones every run) from
schemathesis' positive and negative strategies, after the schema's own examples. Half of the bodies that name a ``model`` name a served one instead
of a random string, so that generation itself runs (a fuzz that only ever meets 404 would test the router); half of
the requests carry the admin token, so that the admin routes get past authentication. The statuses seen are checked
afterwards: every generation route must have answered both 200 and 400, or the fuzz did not reach what it is for.
"""

import pytest
import torch

from fastpeft import tiny

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 (hypothesis comes with schemathesis)
from hypothesis import strategies as st  # noqa: E402

TIMEOUT_S = 60
EXAMPLES = {"POST /v1/completions": 40, "POST /v1/chat/completions": 40}  # the others: 15
BASE = "fastpeft-tiny"
TOKEN = "fuzz-admin"


@pytest.fixture(scope="module")
def server():
    from peft import PrefixTuningConfig, get_peft_model

    from fastpeft.serve import build_server

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        tenant = get_peft_model(tiny.build_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    # Small limits keep each generated request to a few decode steps.
    server = build_server(tiny.build_model(), tiny.build_tokenizer(), {"tenant-a": tenant.eval()}, base_name=BASE,
                          admin_token=TOKEN, max_batch=4, max_len=128, max_queue=8, max_tokens_limit=6,
                          default_max_tokens=4, default_temperature=0.0).start()
    yield server
    server.close()


def test_no_generated_request_gets_a_server_error(server):
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                               "GET /v1/models", "POST /admin/adapters"}
    statuses = {}
    for operation in operations:
        seen = statuses.setdefault(operation.label, set())
        modes = [GenerationMode.POSITIVE]
        if operation.body or operation.path_parameters:
            modes.append(GenerationMode.NEGATIVE)
        strategy = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))

        @settings(max_examples=EXAMPLES.get(operation.label, 15), deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy, model=st.sampled_from([None, BASE, "tenant-a"]), authorized=st.booleans())
        def request(case, model, authorized):
            if model is not None and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model
            headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else None
            response = case.call(headers=headers, timeout=TIMEOUT_S)
            seen.add(response.status_code)
            case.validate_response(response, checks=[not_a_server_error], headers=headers)

        request()
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert {200, 400} <= statuses[label], (label, statuses[label])
    assert statuses["GET /v1/models"] == {200}
    assert 400 in statuses["POST /admin/adapters"] and 401 in statuses["POST /admin/adapters"], statuses
    assert max(status for seen in statuses.values() for status in seen) < 500
    assert server.engine.stats["tokens"] > 0  # generation really ran
