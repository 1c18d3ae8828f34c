"""tests/peft_suite/summarize.py, the comparison `.ci/run-peft-suite` prints, on hand-written JUnit files."""

import importlib.util
import json
import pathlib

import pytest

_SUMMARIZE = pathlib.Path(__file__).parent / "peft_suite" / "summarize.py"
_spec = importlib.util.spec_from_file_location("peft_suite_summarize", _SUMMARIZE)
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)

_SUITE_PROPERTIES = """<properties><property name="transformers_version" value="5.24.0"/>
<property name="peft_version" value="0.21.2"/><property name="torch_version" value="2.13.0+cpu"/>
<property name="fastpeft_peft_suite_mode" value="{mode}"/></properties>"""


def _junit(path, mode, cases):
    path.write_text(f'<testsuites><testsuite name="pytest">{_SUITE_PROPERTIES.format(mode=mode)}'
                    f'{"".join(cases)}</testsuite></testsuites>')
    return str(path)


def _case(name, outcome="passed", message="", **properties):
    classname = "" if name.startswith("tests.") else "tests.test_decoder_models.TestDecoderModels"
    props = "".join(f'<property name="{key}" value="{value}"/>' for key, value in properties.items())
    body = f"<properties>{props}</properties>" if props else ""
    if outcome == "failed":
        body += f'<failure message="{message}">E   {message}</failure>'
    elif outcome == "error":
        body += f'<error message="collection failure">E   {message}</error>'
    elif outcome == "skipped":
        body += '<skipped message="skip"/>'
    return f'<testcase classname="{classname}" name="{name}">{body}</testcase>'


@pytest.fixture
def runs(tmp_path):
    baseline = _junit(tmp_path / "baseline.xml", "baseline", [
        _case("test_forward[PrefixTuningConfig]"),
        _case("test_generate[PromptTuningConfig]"),
        _case("test_gemma4"),
        _case("test_save[PrefixTuningConfig]"),
        _case("test_config[CPTConfig]"),
        _case("test_deberta[PrefixTuningConfig]"),
        _case("test_training[PromptEncoderConfig]"),
        _case("test_disable_adapter[PrefixTuningConfig]", "failed", "AssertionError: PEFT's own"),
        _case("test_half_prec[PromptTuningConfig]", "skipped"),
        _case("tests.test_vision_models", "error", "OSError: no dataset"),
    ])
    accelerated = _junit(tmp_path / "accelerated.xml", "accelerated", [
        _case("test_forward[PrefixTuningConfig]", fastpeft_models=1, fastpeft_attention="sdpa=4"),
        _case("test_generate[PromptTuningConfig]", fastpeft_models=1, fastpeft_attention="reference=2,sdpa=12"),
        _case("test_gemma4", "failed", "ValueError: head_dim at 0xdeadbeef", fastpeft_models=1),
        _case("test_save[PrefixTuningConfig]", fastpeft_models=2),
        _case("test_config[CPTConfig]", fastpeft_models=0),
        _case("test_deberta[PrefixTuningConfig]", fastpeft_models=1, fastpeft_fallback="DeBERTa takes no KV cache"),
        _case("test_training[PromptEncoderConfig]", fastpeft_models=1, fastpeft_attention="reference=8"),
        _case("test_disable_adapter[PrefixTuningConfig]", fastpeft_models=1, fastpeft_attention="sdpa=2"),
        _case("test_half_prec[PromptTuningConfig]", "skipped"),
        _case("tests.test_vision_models", "error", "OSError: no dataset"),
    ])
    return baseline, accelerated


def test_compare_counts_outcomes_regressions_and_attention(runs):
    summary = summarize.compare(*runs)
    assert (summary["transformers"], summary["peft"], summary["mode"]) == ("5.24.0", "0.21.2", "accelerated")
    assert summary["plain"] == {"passed": 7, "failed": 1, "skipped": 1}
    assert summary["accelerated"] == {"passed": 7, "failed": 1, "skipped": 1}
    assert summary["not_collected"] == ["tests/test_vision_models.py: OSError: no dataset"]
    assert (summary["plain_passes_kept"], summary["plain_passes"]) == (6, 7)
    assert summary["regressions"] == [{"test": "tests/test_decoder_models.py::TestDecoderModels::test_gemma4",
                                       "error": "ValueError: head_dim"}]
    assert summary["accelerated_only_passes"] == [
        "tests/test_decoder_models.py::TestDecoderModels::test_disable_adapter[PrefixTuningConfig]"]
    assert summary["attention"] == {
        "tests_run": 8, "fastpeft_kernels": 3, "fastpeft_reference_only": 1, "fallback": 1, "never_reached": 3,
        "fastpeft_kernels_passed": 3, "fastpeft_kernels_by_backend": {"sdpa": 3}, "never_reached_without_model": 1}
    assert summary["fallback_reasons"] == {"DeBERTa takes no KV cache": 1}


def test_main_files_each_version_and_fails_on_a_regression(runs, tmp_path, capsys):
    all_versions = tmp_path / "all.json"
    all_versions.write_text(json.dumps({"transformers 5.17.0 / peft 0.21.0": {"kept": "as it was"}}))
    code = summarize.main(["compare", *runs, "--json", str(tmp_path / "one.json"), "--all-versions",
                           str(all_versions)])
    assert code == 1
    printed = capsys.readouterr().out
    assert "tests/test_decoder_models.py::TestDecoderModels::test_gemma4\n         ValueError: head_dim" in printed
    filed = json.loads(all_versions.read_text())
    assert filed["transformers 5.17.0 / peft 0.21.0"] == {"kept": "as it was"}
    assert filed["transformers 5.24.0 / peft 0.21.2"] == json.loads((tmp_path / "one.json").read_text())
