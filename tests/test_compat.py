"""fastpeft.integration.compat: the version-dependent lookups, the tested-version bookkeeping, and that the
package metadata, the constraints file and TESTED_VERSIONS agree."""

import os
import re
import warnings
from dataclasses import dataclass

import pytest

from fastpeft.ops import environment
from fastpeft.integration import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(environment, "_warned_messages", set())


def _pretend_installed(monkeypatch, **versions):
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version", lambda package: versions.get(package) or real(package))


def test_release_numbers_ignore_tags():
    assert compat._release("5.24.0") == (5, 24, 0)
    assert compat._release("5.25.0.dev0") == (5, 25, 0)
    assert compat._release("0.21.2+local") == (0, 21, 2)
    assert compat._release("6.0.0rc1") == (6, 0, 0)


@pytest.mark.parametrize("version,status", [("99.0.0", "newer than tested"), ("5.0.0", "older than tested"),
                                            (None, "tested")])
def test_version_status(monkeypatch, version, status):
    oldest, newest = compat.TESTED_VERSIONS["transformers"]
    _pretend_installed(monkeypatch, transformers=version or newest)
    assert compat.version_status("transformers") == (version or newest, status)


def test_newer_release_warns_once_per_process(monkeypatch, fresh_warnings):
    _pretend_installed(monkeypatch, peft="9.0.0")
    with pytest.warns(RuntimeWarning, match=r"peft 9\.0\.0 is newer than the newest release"):
        compat.warn_if_untested("AdapterBank")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.warn_if_untested("AdapterBank")


def test_accelerate_warns_on_a_newer_transformers(monkeypatch, fresh_warnings):
    import fastpeft
    from tests.accelerate_helpers import make_peft_model

    _pretend_installed(monkeypatch, transformers="99.1.0")
    with pytest.warns(RuntimeWarning, match=r"transformers 99\.1\.0 is newer"):
        fastpeft.accelerate(make_peft_model("llama", "prefix"))


def test_tested_versions_installed_pass_quietly(fresh_warnings):
    for package in compat.TESTED_VERSIONS:
        installed, status = compat.version_status(package)
        if status != "tested":
            pytest.skip(f"{package} {installed} is {status} (run by .ci/run-latest)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.warn_if_untested("fastpeft.accelerate")


def test_metadata_and_constraints_agree_with_tested_versions():
    """pyproject's floors are the oldest tested releases; constraints.txt pins the newest (what CI installs)."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        constraints = dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))
    for package, (oldest, newest) in compat.TESTED_VERSIONS.items():
        floor = re.search(rf'"{package}>=([0-9.]+)', pyproject).group(1)
        assert compat._release(oldest)[:len(compat._release(floor))] == compat._release(floor), package
        assert constraints[package] == newest, package
    assert "torch" not in constraints  # the machine picks its torch build


def test_cache_lookups_under_either_name():
    cache = object()
    assert compat.cache_in({"cache": cache}) is cache
    assert compat.cache_in({"past_key_values": cache}) is cache
    assert compat.cache_in({"input_ids": 1}) is None

    @dataclass
    class NewOutput:
        logits: object = None
        cache: object = None

    @dataclass
    class OldOutput:
        logits: object = None
        past_key_values: object = None

    assert compat.cache_of(NewOutput(cache=cache)) is cache
    assert compat.cache_of(OldOutput(past_key_values=cache)) is cache
    assert compat.cache_of(object()) is None


def test_cache_keyword_follows_the_model_signature():
    class New:
        def forward(self, input_ids=None, cache=None):
            pass

    class Old:
        def forward(self, input_ids=None, past_key_values=None):
            pass

    class Encoder:
        def forward(self, input_ids=None, **kwargs):
            pass

    assert compat.cache_kwargs(New(), 1) == {"cache": 1}
    assert compat.cache_kwargs(Old(), 1) == {"past_key_values": 1}
    assert compat.cache_kwargs(Encoder(), None) == {}
    with pytest.raises(ValueError, match="takes no KV cache"):
        compat.cache_kwargs(Encoder(), 1)


def test_info_reports_tested_versions(capsys):
    import json

    from fastpeft import cli

    assert cli.main(["info", "--json"]) == 0
    tested = json.loads(capsys.readouterr().out)["tested_versions"]
    assert set(tested) == {"transformers", "peft"}
    for package, entry in tested.items():
        assert entry["status"] == compat.version_status(package)[1]
        assert entry["tested"] == " to ".join(compat.TESTED_VERSIONS[package])


class _UnreadableConfig:
    """A configuration whose attributes raise something other than AttributeError, as transformers' heterogeneous
    configurations do for per-layer attributes."""

    model_type = "unreadable"
    num_hidden_layers, hidden_size, num_attention_heads = 2, 64, 4

    @property
    def num_key_value_heads(self):
        raise RuntimeError("computed from a broken sub-config")


def test_config_attributes_that_cannot_be_read_are_named_value_errors():
    """Another library's exception while reading a configuration attribute becomes a ValueError naming the attribute;
    a missing attribute is the default, as with getattr."""
    from fastpeft.integration.geometry import BaseGeometry

    config = _UnreadableConfig()
    assert compat.config_attribute(config, "head_dim", 7) == 7
    with pytest.raises(compat.ConfigReadError, match=r"config.num_key_value_heads of 'unreadable' cannot be read "
                                                     r"\(RuntimeError: computed from a broken sub-config\)") as error:
        compat.config_attribute(config, "num_key_value_heads")
    assert isinstance(error.value, ValueError) and not error.value.per_layer
    with pytest.raises(ValueError, match="num_key_value_heads"):
        BaseGeometry.of(config)
    config.num_hidden_layers = None
    with pytest.raises(ValueError, match="no positive integer num_hidden_layers"):
        BaseGeometry.of(config)


def test_kv_sharing_sources_come_from_the_modules():
    """Layers that reuse another layer's K/V map to the last non-sharing layer of their type; a sharing layer whose
    provider cannot be told apart is refused by name."""
    import torch

    def attention_module(layer_idx, layer_type, shared=False, store=False):
        module = torch.nn.Module()
        module.layer_idx, module.layer_type = layer_idx, layer_type
        module.is_kv_shared_layer, module.store_full_length_kv = shared, store
        return module

    model = torch.nn.ModuleList([attention_module(0, "sliding"), attention_module(1, "full", store=True),
                                 attention_module(2, "sliding", store=True), attention_module(3, "sliding", shared=True),
                                 attention_module(4, "full", shared=True)])
    assert compat.kv_sharing_sources(model) == {3: 2, 4: 1}
    assert compat.kv_sharing_sources(torch.nn.Linear(2, 2)) == {}
    model.append(attention_module(5, "sliding", store=True))
    with pytest.raises(ValueError, match="layer 3 reuses another layer's keys and values"):
        compat.kv_sharing_sources(model)
