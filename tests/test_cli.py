"""The ``fastpeft`` command line: help, info, training on the built-in model, loading the adapter in plain
PEFT, generation with several adapters, and one-line errors for bad arguments.

The entry point runs in subprocesses (as a user runs it, from a directory outside the checkout), with
timeouts, for one training run, one generation and the one-line errors; the other cases call ``cli.main`` in
this process (same code, without paying the interpreter start-up again). Training runs use the built-in small
model for a few steps.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastpeft import cli, data, tiny
from fastpeft.cli import demo

TIMEOUT_S = 240
SUBCOMMANDS = ("train", "generate", "bench", "info")
# fastpeft.accelerate is built in parallel with the CLI; train through it whenever this install has it
ACCELERATE_FLAGS = [] if importlib.util.find_spec("fastpeft.integration.peft") else ["--no-accelerate"]
MULTI_PRESENT = importlib.util.find_spec("fastpeft.multi") is not None


def user_environment():
    """The environment a user runs the CLI in: without the test session's backend switches (conftest turns the
    Triton interpreter on for the whole CPU session, which would make every kernel call crawl)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    for name in ("FASTPEFT_DEBUG", "FASTPEFT_BACKEND", "TRITON_INTERPRET"):
        env.pop(name, None)
    return env


def run_cli(args, cwd, timeout=TIMEOUT_S):
    """``python -m fastpeft ARGS`` in a subprocess; returns the CompletedProcess (text mode)."""
    env = user_environment()
    return subprocess.run([sys.executable, "-m", "fastpeft", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------
# help and info (in process: argparse and the info collector are plain functions)


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_subcommand_help(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([subcommand, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastpeft {subcommand}")
    expected_option = {"train": "--virtual-tokens", "generate": "--adapter", "bench": "--suite",
                       "info": "--json"}[subcommand]
    assert expected_option in out


def test_info_reports_versions_device_and_backends(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or \
        info["versions"]["torch"] == torch.__version__
    assert set(info["backends"]) == {"cuda", "triton", "sdpa", "reference"}
    assert info["backends"]["reference"]["available"] is True
    assert info["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    for state in info["backends"].values():
        assert state["why"]  # every backend says why it is (not) available
    assert set(info["backends"]["sdpa"]["cpu_extension"]) == {"available", "why"}
    assert info["features"]["fastpeft.accelerate"] == bool(ACCELERATE_FLAGS == [])



def test_info_into_a_closed_pipe_is_quiet():
    """``fastpeft info | head -1``: the reader leaves before the output is written; no BrokenPipeError message."""
    process = subprocess.Popen([sys.executable, "-m", "fastpeft", "info"], env=user_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before info has printed anything (it collects first, then prints)
    stderr = process.stderr.read().decode()
    process.wait(timeout=TIMEOUT_S)
    assert stderr == ""


# ----------------------------------------------------------------------------------------------------------
# data loading


def test_load_text_jsonl_and_prompt_completion(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("first line\n\n  \nsecond line\n")
    assert [e.completion for e in data.load_examples(str(text))] == ["first line", "second line"]

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "plain"}\n{"prompt": "Q: 2+2?", "completion": " 4", "task": "math"}\n')
    examples = data.load_examples(str(jsonl))
    assert (examples[0].prompt, examples[0].completion, examples[0].task) == ("", "plain", None)
    assert (examples[1].prompt, examples[1].completion, examples[1].task) == ("Q: 2+2?", " 4", "math")


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', "train.jsonl:2: not valid JSON"),
    ('{"prompt": "no completion"}\n', "train.jsonl:1: expected"),
    ('[1, 2]\n', "train.jsonl:1: each JSONL line must be an object"),
    ("\n\n", "no examples"),
])
def test_malformed_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        data.load_examples(str(path))


def test_encode_masks_the_prompt_and_collate_right_pads():
    tokenizer = tiny.build_tokenizer()
    examples = [data.Example("ab", "cd"), data.Example("", "xyz"), data.Example("long prompt", "z")]
    rows, dropped = data.encode(examples, tokenizer, max_length=6)
    # The third example's completion is cut away by max_length: no loss left, dropped.
    assert dropped == 1 and len(rows) == 2
    bos, eos = tiny.BOS_ID, tiny.EOS_ID
    assert rows[0].input_ids == [bos, ord("a"), ord("b"), ord("c"), ord("d"), eos]
    assert rows[0].labels == [-100, -100, -100, ord("c"), ord("d"), eos]
    assert rows[1].input_ids == [bos, ord("x"), ord("y"), ord("z"), eos]
    # plain text: loss on every token but bos (position 0 is never a prediction target)
    assert rows[1].labels == [-100, ord("x"), ord("y"), ord("z"), eos]
    batch = data.collate(rows, pad_token_id=tiny.PAD_ID)
    assert batch["input_ids"][1].tolist() == rows[1].input_ids + [tiny.PAD_ID]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch["labels"][1, -1].item() == -100


def test_batches_visit_every_row_once_per_epoch():
    rows = [data.EncodedExample([i, i], [i, i]) for i in range(7)]
    stream = data.batches(rows, batch_size=3, pad_token_id=0, seed=1)
    epoch0 = [next(stream) for _ in range(3)]
    assert [e for e, _, _ in epoch0] == [0, 0, 0]
    seen = sorted(int(x) for _, b, _ in epoch0 for x in b["input_ids"][:, 0])
    assert seen == list(range(7))
    assert next(stream)[0] == 1


def test_tiny_tokenizer_round_trips_bytes(tmp_path):
    tokenizer = tiny.build_tokenizer()
    text = "héllo, wörld \t\n ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == tiny.PAD_ID


# ----------------------------------------------------------------------------------------------------------
# train -> load in PEFT -> generate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two adapters trained on the built-in model: prefix tuning on the built-in lines, prompt tuning on a
    prompt/completion JSONL file. Returns {name: directory}."""
    root = tmp_path_factory.mktemp("cli")
    jsonl = root / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i}"}) for i in range(6)))
    tasks = root / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"task": t, "text": f"{t} example {i}"})
                               for i in range(4) for t in ("alpha", "beta")))
    runs = {
        "prefix": ["train", "--method", "prefix", "--virtual-tokens", "8", "--max-steps", "3",
                   "--batch-size", "8", "--out", str(root / "prefix")],
        "prompt": ["train", "--method", "prompt", "--virtual-tokens", "4", "--max-steps", "2",
                   "--batch-size", "4", "--data", str(jsonl), "--out", str(root / "prompt")],
    }
    if MULTI_PRESENT:
        runs["tasks"] = ["train", "--virtual-tokens", "6", "--max-steps", "2", "--batch-size", "8", "--data",
                         str(tasks), "--out", str(root / "tasks")]
    # The first run goes through the installed entry point; the others run in this process to spare the
    # test budget the interpreter start-up and imports.
    result = run_cli(runs.pop("prefix") + ACCELERATE_FLAGS, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained a prefix adapter" in result.stdout and f"saved to {root / 'prefix'}" in result.stdout
    with pytest.MonkeyPatch.context() as patch:  # a module fixture runs before conftest's per-test backend pin
        patch.setenv("FASTPEFT_BACKEND", "reference")
        for args in runs.values():
            assert cli.main(args + ACCELERATE_FLAGS) == 0
    return {name: root / name for name in ("prefix", "prompt", "tasks")}


def _warnings(stderr):
    """stderr lines other than the progress bar's redraws."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not re.match(r"^train \w+.*\d+/\d+ \[", line)]


def test_main_job_learns_the_built_in_task_quietly(tmp_path):
    """The README's main job on a fresh folder: the trained prefix answers held-out prompts the base model cannot,
    then `generate` serves it; neither command writes anything but the progress bar to stderr (no warnings)."""
    env = dict(user_environment())
    env.pop("PYTHONWARNINGS")  # as a user runs it: every warning shows
    out = tmp_path / "fp-demo"
    result = subprocess.run([sys.executable, "-m", "fastpeft", "train", "--out", str(out), *ACCELERATE_FLAGS],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _warnings(result.stderr) == []
    task = json.loads((out / "train_log.json").read_text())["built_in_task"]
    assert task["base_correct"] == 0 and task["trained_correct"] >= demo.HELD_OUT - 2, task
    assert "exact answers: base model 0/8" in result.stdout
    prompt = demo.examples()[1][0].prompt
    result = subprocess.run([sys.executable, "-m", "fastpeft", "generate", "--adapter", f"demo={out}", "--prompt",
                             prompt, "--max-new-tokens", "24", "--json"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    assert json.loads(result.stdout)[0]["completion"].strip() == task["trained"][0].strip()


def _leftovers(parent):
    """Staging folders ``train`` left beside its --out."""
    return [name for name in os.listdir(parent) if ".partial-" in name or ".replaced-" in name]


def _small_train(out, *extra):
    return ["train", "--virtual-tokens", "4", "--max-steps", "1", "--batch-size", "2", "--out", str(out), *extra,
            *ACCELERATE_FLAGS]


def test_train_refuses_a_non_empty_out_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(_small_train(out)) == cli.common.EXIT_USAGE
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert cli.main(_small_train(out, "--overwrite")) == 0
    assert sorted(os.listdir(out)) == sorted(["adapter_config.json", "adapter_model.safetensors", "base-model",
                                              "README.md", "train_log.json"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base-model")  # the final folder, not the staging one
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_train_leaves_out_as_it_was(tmp_path, monkeypatch, existing):
    """Ctrl-C in the middle of training: no half-written --out (no base model without its adapter), an existing
    --out untouched even with --overwrite, no staging folder left behind."""
    from fastpeft.cli import train

    out = tmp_path / "run"
    if existing:
        assert cli.main(_small_train(out)) == 0
        before = {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_run_steps", interrupted)
    assert cli.main(_small_train(out, "--overwrite")) == 130
    if existing:
        assert {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)} == before
    else:
        assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_train_writes_adapter_log_and_base_model(trained):
    log = json.loads((trained["prefix"] / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3]
    assert all(s["loss"] > 0 and s["tokens_per_s"] > 0 for s in log["steps"])
    # the built-in task's batches share two answers: three Adam steps at its lr lower the loss
    assert log["steps"][-1]["loss"] < log["steps"][0]["loss"]
    assert log["config"]["method"] == "prefix" and log["config"]["virtual_tokens"] == 8
    assert log["config"]["lr"] == demo.LEARNING_RATE and log["examples"] == demo.TRAIN_EXAMPLES
    task = log["built_in_task"]  # three steps are too few to learn it: scored, not yet right
    assert len(task["prompts"]) == len(task["trained"]) == demo.HELD_OUT and task["base_correct"] == 0
    assert log["accelerated"] is (ACCELERATE_FLAGS == [])
    config = json.loads((trained["prefix"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 8
    assert config["base_model_name_or_path"] == str((trained["prefix"] / "base-model").resolve())
    prompt_log = json.loads((trained["prompt"] / "train_log.json").read_text())
    assert prompt_log["examples"] == 6 and len(prompt_log["steps"]) == 2


@pytest.mark.skipif(not MULTI_PRESENT, reason="fastpeft.MultiPrefixTrainer not present")
def test_train_one_adapter_per_task(trained):
    log = json.loads((trained["tasks"] / "train_log.json").read_text())
    assert log["tasks"] == ["alpha", "beta"] and len(log["steps"]) == 2
    # both tasks are in every batch of 8 (the whole file): each adapter is stepped every step
    assert all(sorted(s["updated"]) == ["alpha", "beta"] for s in log["steps"])
    for task in ("alpha", "beta"):
        config = json.loads((trained["tasks"] / task / "adapter_config.json").read_text())
        assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 6
        assert config["base_model_name_or_path"] == str((trained["tasks"] / "base-model").resolve())


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_adapter_loads_in_plain_peft(trained, name):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(trained[name] / "base-model"))
    model = PeftModel.from_pretrained(base, str(trained[name]))
    saved = load_file(str(trained[name] / "adapter_model.safetensors"))["prompt_embeddings"]
    # the trained prompt differs from a fresh initialization and is what PEFT now holds
    if name == "prefix":
        loaded = model.prompt_encoder["default"].embedding.weight
        assert saved.shape == (8, 4 * 2 * 2 * 32)  # P x (layers * 2 * kv heads * head size)
    else:
        loaded = model.prompt_encoder["default"].embedding.weight
        assert saved.shape == (4, 256)
    torch.testing.assert_close(loaded.detach(), saved)
    tokenizer = tiny.build_tokenizer()
    batch = tokenizer(["hello"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(importlib.util.find_spec("fastpeft.bank") is None, reason="fastpeft.AdapterBank not present")
def test_generate_two_adapters_matches_plain_peft(trained, tmp_path, capsys):
    common = ["generate", "--adapter", f"pre={trained['prefix']}", "--adapter", f"pro={trained['prompt']}",
              "--prompt", "Hello", "--prompt", "Q1: ", "--max-new-tokens", "6", "--json"]
    bank = run_cli(common, cwd=tmp_path)
    assert bank.returncode == 0, bank.stderr[-2000:]
    outputs = json.loads(bank.stdout)
    assert [(o["prompt"], o["adapter"]) for o in outputs] == [
        ("Hello", "pre"), ("Hello", "pro"), ("Q1: ", "pre"), ("Q1: ", "pro")]
    assert all(o["completion"] for o in outputs)
    capsys.readouterr()
    assert cli.main(common + ["--engine", "peft"]) == 0
    # greedy, float32: the batched bank gives each row exactly what PEFT gives it alone
    assert json.loads(capsys.readouterr().out) == outputs


# ----------------------------------------------------------------------------------------------------------
# train on an encoder-decoder --model (the built-in T5)


@pytest.fixture(scope="module")
def t5_data(tmp_path_factory):
    """The built-in T5 saved as a model directory, and prompt/completion files with and without tasks."""
    root = tmp_path_factory.mktemp("t5")
    tiny.save_tiny(str(root / "base"), encoder_decoder=True)
    tasks = _write(root / "tasks.jsonl", "\n".join(
        json.dumps({"task": t, "prompt": f"{t} question {i}", "completion": f"{t} answer {i}"})
        for i in range(4) for t in ("alpha", "beta")))
    single = _write(root / "qa.jsonl", "\n".join(json.dumps({"prompt": f"Q{i}", "completion": f"A{i}"})
                                                for i in range(4)))
    return root, tasks, single


@pytest.mark.skipif(not MULTI_PRESENT, reason="fastpeft.MultiPrefixTrainer not present")
@pytest.mark.parametrize("method", ["prefix", "ptuning"])
def test_train_tasks_on_an_encoder_decoder(t5_data, method, tmp_path):
    """One adapter per task on the built-in T5, in shared batches: each task's PEFT SEQ_2_SEQ_LM adapter moved from
    its initial values, its loss fell, and it loads in plain PEFT, where its loss on its own examples is what the
    trainer computes for them."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from fastpeft import MultiPrefixTrainer

    root, tasks, _ = t5_data
    out = tmp_path / "out"
    assert cli.main(["train", "--model", str(root / "base"), "--data", str(tasks), "--method", method,
                     "--virtual-tokens", "4", "--max-steps", "3", "--batch-size", "8", "--out", str(out)]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["tasks"] == ["alpha", "beta"] and len(log["steps"]) == 3
    assert all(sorted(step["updated"]) == ["alpha", "beta"] for step in log["steps"])
    for task in ("alpha", "beta"):
        assert log["steps"][-1]["adapter_losses"][task] < log["steps"][0]["adapter_losses"][task]
    tokenizer = tiny.build_tokenizer()
    examples = data.load_examples(str(tasks))
    rows, _ = data.encode(examples, tokenizer, 512, encoder_decoder=True)
    trainer = MultiPrefixTrainer(AutoModelForSeq2SeqLM.from_pretrained(str(root / "base")))
    for task in ("alpha", "beta"):
        config = json.loads((out / task / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_2_SEQ_LM" and config["num_virtual_tokens"] == 4
        assert config["peft_type"] == {"prefix": "PREFIX_TUNING", "ptuning": "P_TUNING"}[method]
        assert config["base_model_name_or_path"] == str((root / "base").resolve())
        trainer.add_adapter(task, str(out / task))
        own = data.collate([row for row in rows if row.task == task], tokenizer.pad_token_id, encoder_decoder=True)
        loaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(root / "base")),
                                           str(out / task)).eval()
        with torch.no_grad():
            expected = loaded(**own).loss.item()
            ours = trainer(own["input_ids"], [task] * len(own["input_ids"]), attention_mask=own["attention_mask"],
                         labels=own["labels"]).adapter_losses[task]
        assert ours == pytest.approx(expected, rel=1e-5)


def test_train_one_adapter_on_an_encoder_decoder(t5_data, tmp_path):
    """Without tasks: PEFT's PeftModelForSeq2SeqLM under fastpeft.accelerate; the adapter loads in plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    root, _, single = t5_data
    out = tmp_path / "one"
    assert cli.main(["train", "--model", str(root / "base"), "--data", str(single), "--method", "prompt",
                     "--virtual-tokens", "3", "--max-steps", "2", "--batch-size", "4", "--out", str(out),
                     *ACCELERATE_FLAGS]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["peft_type"] == "PROMPT_TUNING"
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(root / "base")), str(out))
    batch = tiny.build_tokenizer()(["Q1"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch, labels=torch.tensor([[65, 49]])).logits).all()


@pytest.mark.parametrize("data_file, message", [
    (None, "is an encoder-decoder; the built-in task is for causal LMs"),
    ("text", "example 1 has no prompt: an encoder-decoder trains on"),
])
def test_train_on_an_encoder_decoder_refuses_data_without_inputs(t5_data, data_file, message, tmp_path, capsys):
    root, _, _ = t5_data
    extra = [] if data_file is None else ["--data", str(_write(tmp_path / "lines.txt", "hello\nworld\n"))]
    assert cli.main(["train", "--model", str(root / "base"), "--out", str(tmp_path / "o"), *extra]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------
# bad arguments: one line on stderr, non-zero exit, no traceback


def _other_base_model(directory):
    """A model directory whose config has other shapes than the built-in model (2 layers, hidden 128)."""
    directory.mkdir()
    config = dict(tiny.TINY_CONFIG, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=2,
                  hidden_size=128, head_dim=16)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _write(path, text):
    path.write_text(text)
    return path


def _unnamed_base_adapter(source, directory):
    """A copy of the adapter at ``source`` whose adapter_config.json names no base model (as one saved from a model
    built in memory)."""
    import shutil

    shutil.copytree(source, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def _bad_arguments(case, trained, tmp_path):
    """(argv, text the one-line error must contain) for each kind of mistake."""
    return {
        "missing-data": (["train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
                         "no such file"),
        "unknown-method": (["train", "--method", "lora", "--out", str(tmp_path / "o")], "invalid choice"),
        "missing-adapter": (["generate", "--adapter", f"a={tmp_path / 'absent'}", "--prompt", "x"],
                            "no such directory"),
        "other-base": (["generate", "--model", str(_other_base_model(tmp_path / "other")), "--adapter",
                        f"a={trained['prefix']}", "--prompt", "x"], "trained for another base model"),
        "bad-steps": (["train", "--max-steps", "0", "--out", str(tmp_path / "o")], "--max-steps"),
        "no-prompt": (["generate", "--adapter", f"a={trained['prefix']}"], "--prompt"),
        "unnamed-base": (["generate", "--adapter", f"a={_unnamed_base_adapter(trained['prefix'], tmp_path / 'u')}",
                          "--prompt", "x"], "--model DIR is needed: adapter 'a' does not name its base model"),
        "both-quantizations": (["train", "--load-in-4bit", "--load-in-8bit", "--out", str(tmp_path / "o")],
                               "not allowed with"),
        "peft-checkpointing": (["train", "--no-accelerate", "--gradient-checkpointing", "--out",
                                str(tmp_path / "o")], "PEFT refuses gradient checkpointing"),
        "malformed-data": (["train", "--data", str(_write(tmp_path / "bad.jsonl", '{"text": 1}\n')), "--out",
                            str(tmp_path / "o")], "bad.jsonl:1"),
    }[case]


@pytest.mark.parametrize("case", ["missing-data", "unknown-method", "missing-adapter", "other-base",
                                  "bad-steps", "no-prompt", "both-quantizations", "peft-checkpointing",
                                  "malformed-data", "unnamed-base"])
def test_bad_arguments_fail_with_one_line(case, trained, tmp_path, capsys):
    args, expected = _bad_arguments(case, trained, tmp_path)
    status = cli.main(args)  # an uncaught exception (a traceback) would fail this test
    assert status != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastpeft") and expected in lines[0], lines
    assert not (tmp_path / "o").exists()  # refused before doing anything


@pytest.mark.parametrize("case", ["unknown-method", "other-base"])
def test_bad_arguments_from_the_entry_point(case, trained, tmp_path):
    args, expected = _bad_arguments(case, trained, tmp_path)
    result = run_cli(args, cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------
# README


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_opens_with_the_main_job_and_the_test_command():
    with open(README) as f:
        first_block = f.read().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith('pip install -c constraints.txt setuptools && pip install --no-build-isolation '
                                     '-c constraints.txt -e ".[test]" && fastpeft train ')
    assert "fastpeft generate --adapter" in first_block[0]
    assert first_block[1].split("#")[0].strip() == "python -m pytest -q tests"  # what .ci/run runs


@pytest.mark.gpu
def test_train_and_generate_on_cuda(tmp_path):
    """On a GPU (bf16 backbone): train through fastpeft.accelerate, then serve through the bank."""
    result = run_cli(["train", "--device", "cuda", "--max-steps", "3", "--virtual-tokens", "8", "--out",
                      str(tmp_path / "gpu")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    log = json.loads((tmp_path / "gpu" / "train_log.json").read_text())
    assert log["device"].startswith("cuda") and log["dtype"] == "bfloat16" and log["accelerated"] is True
    result = run_cli(["generate", "--device", "cuda", "--adapter", f"a={tmp_path / 'gpu'}", "--prompt", "Hi",
                      "--max-new-tokens", "4", "--json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads(result.stdout)) == 1
