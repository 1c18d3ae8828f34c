"""lm-evaluation-harness against ``fastpeft serve``, checked against PEFT's own forward: the acceptance test of issue
#25 part 1 (run by ``.ci/run-lm-eval``, which pins lm-eval).

What it does, offline, in a work folder:
  1. saves the built-in model with its byte tokenizer (``fastpeft.tiny.save_tiny``) and two adapters made with PEFT
     on it: prefix tuning (4 virtual tokens) and prompt tuning (6), seeded;
  2. starts ``python -m fastpeft serve --model <that folder> --adapters <adapters>`` on a loopback port (CPU,
     float32, greedy by default);
  3. runs ``lm-eval run --model local-completions`` once per adapter on the two local tasks of ``tasks/`` (a
     multiple-choice task and a generate_until task over JSON Lines files), tokenizing with the saved tokenizer
     (``tokenizer_backend=huggingface``, token-id requests as lm-eval sends by default: ``"prompt": [[ids], ...]``);
     the prefix adapter with ``batch_size=1`` (one prompt per request), the prompt-tuning adapter with
     ``batch_size=3`` (three prompts per request, the last batch shorter);
  4. recomputes every sample with PEFT's forward for that adapter, without lm-eval and without the server:
     each loglikelihood request (context, continuation), tokenized as lm-eval does (``TemplateLM._encode_pair``, no
     special tokens), as one forward of PeftModel on context + continuation (prompt tuning's logits for its virtual
     tokens sliced off), the continuation tokens' float32 log-probabilities summed, and whether each was the argmax;
     each generation as greedy decoding over PEFT's forward without a cache
     (``fastpeft.integration.reference_generate.generate_without_cache``, ended at end-of-sequence), decoded and cut
     at the task's stop strings as the server does.

Passes when every log-likelihood equals PEFT's (relative 1e-5), every is_greedy flag and every generation is equal.
lm-eval's ``--model hf`` with ``peft=`` is not used as the oracle: it needs ``add_bos_token=True`` on both sides to
score the same text, scores the wrong positions for prompt tuning (PEFT's forward returns the virtual tokens' logits
first) and generates through PEFT's ``generate``, which on transformers 5.24 ignores a prefix.

    python tests/lm_eval_check/check.py [--work DIR]     # exit status 1 on a mismatch; a JSON summary in DIR
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import torch

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
TASKS = ("fastpeft_mc", "fastpeft_gen")
ADAPTERS = {"prefix": 1, "prompt": 3}  # adapter -> lm-eval batch_size (prompts per request)
RELATIVE_TOLERANCE = 1e-5
LM_EVAL_TIMEOUT_S = 900


def save_model_and_adapters(work):
    """The built-in model and tokenizer in ``work/model``; PEFT adapters in ``work/adapters/{prefix,prompt}``."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from fastpeft import tiny

    model_dir = tiny.save_tiny(os.path.join(work, "model"))
    configs = {"prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
               "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)}
    for seed, (name, config) in enumerate(configs.items(), start=1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            get_peft_model(tiny.build_model(), config).save_pretrained(os.path.join(work, "adapters", name))
    return model_dir


def start_server(model_dir, adapters_dir, log_path):
    """``python -m fastpeft serve`` on 127.0.0.1 (a free port); returns (process, base URL)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "fastpeft", "serve", "--model", model_dir, "--adapters",
                                    adapters_dir, "--port", "0", "--device", "cpu", "--dtype", "float32",
                                    "--default-temperature", "0"], stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()  # "fastpeft serve: NAME + N adapter(s) on http://127.0.0.1:PORT/v1 (...)"
    if " on http://" not in line:  # it exited (the line is empty): the reason is in its log
        process.kill()
        raise RuntimeError(f"the server did not start (see {log_path}): {line!r}")
    return process, line.split(" on ", 1)[1].split("/v1", 1)[0]


def run_lm_eval(url, adapter, batch_size, tokenizer_dir, output_dir, env):
    """One ``lm-eval run`` against the server for ``adapter``; returns {task: [sample dicts]}."""
    model_args = ",".join([f"model={adapter}", f"base_url={url}/v1/completions", f"tokenizer={tokenizer_dir}",
                           "tokenizer_backend=huggingface", "tokenized_requests=True", "max_length=512",
                           "num_concurrent=1", "max_retries=1"])
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
               "--tasks", *TASKS, "--include_path", TASKS_DIR, "--batch_size", str(batch_size),
               "--output_path", output_dir, "--log_samples"]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "lm-eval.log"), "w") as log:
        # The task files name their data relative to their folder.
        subprocess.run(command, cwd=TASKS_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, check=True,
                       timeout=LM_EVAL_TIMEOUT_S)
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(os.path.join(output_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
        with open(path) as f:
            samples[task] = [json.loads(line) for line in f]
    return samples


def encode_pair(tokenizer, context, continuation):
    """lm-eval's tokenization of a loglikelihood request (``TemplateLM._encode_pair`` with the huggingface backend
    and no BOS): the context's trailing spaces move to the continuation; the whole is encoded once and split."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def peft_loglikelihood(peft_model, context_ids, continuation_ids):
    """(sum of the continuation tokens' float32 log-probabilities, whether each is the argmax) under PEFT's forward
    on context + continuation."""
    ids = torch.tensor([context_ids + continuation_ids])
    logits = peft_model(input_ids=ids).logits[0]
    logits = logits[logits.shape[0] - ids.shape[1]:]  # prompt tuning: the virtual tokens' logits come first
    logprobs = logits[len(context_ids) - 1:-1].float().log_softmax(-1)
    targets = torch.tensor(continuation_ids)
    chosen = logprobs[torch.arange(len(continuation_ids)), targets]
    return float(chosen.sum()), bool((logprobs.argmax(-1) == targets).all())


def peft_generation(peft_model, tokenizer, context, generation_kwargs, eos_text):
    """Greedy text over PEFT's forward without a cache: the server's decoding (special tokens skipped), cut before
    the first of the task's stop strings and lm-eval's end-of-sequence text."""
    from fastpeft import tiny
    from fastpeft.integration.reference_generate import generate_without_cache

    ids = torch.tensor([tokenizer(context, add_special_tokens=False)["input_ids"]])
    generated, _ = generate_without_cache(peft_model, ids, max_new_tokens=generation_kwargs["max_gen_toks"],
                                          eos_token_id=tiny.EOS_ID)
    new = generated[0, ids.shape[1]:].tolist()
    new = new[:new.index(tiny.EOS_ID)] if tiny.EOS_ID in new else new
    text = tokenizer.decode(new, skip_special_tokens=True)
    cuts = [i for i in (text.find(stop) for stop in list(generation_kwargs["until"]) + [eos_text]) if i >= 0]
    return text[:min(cuts)] if cuts else text


def compare(adapter, adapter_dir, samples, tokenizer):
    """Every sample of ``samples`` against PEFT's forward for ``adapter``; returns the summary and the mismatches."""
    from peft import PeftModel

    from fastpeft import tiny

    peft_model = PeftModel.from_pretrained(tiny.build_model(), adapter_dir).eval()
    mismatches, worst, requests = [], 0.0, 0
    for sample in samples["fastpeft_mc"]:
        for (_, arguments), response in zip(sorted(sample["arguments"].items(), key=lambda item: int(item[0][9:])),
                                            sample["resps"]):
            context, continuation = arguments["arg_0"], arguments["arg_1"]
            served, served_greedy = float(response[0][0]), response[0][1] in (True, "True")
            expected, expected_greedy = peft_loglikelihood(peft_model, *encode_pair(tokenizer, context, continuation))
            relative = abs(served - expected) / abs(expected)
            worst, requests = max(worst, relative), requests + 1
            if not relative <= RELATIVE_TOLERANCE or served_greedy != expected_greedy:
                mismatches.append({"task": "fastpeft_mc", "doc_id": sample["doc_id"], "continuation": continuation,
                                   "served": [served, served_greedy], "peft": [expected, expected_greedy]})
    generations = 0
    for sample in samples["fastpeft_gen"]:
        context, generation_kwargs = sample["arguments"]["gen_args_0"]["arg_0"], \
            sample["arguments"]["gen_args_0"]["arg_1"]
        served = sample["resps"][0][0]
        expected = peft_generation(peft_model, tokenizer, context, generation_kwargs, tokenizer.eos_token)
        generations += 1
        if served != expected:
            mismatches.append({"task": "fastpeft_gen", "doc_id": sample["doc_id"], "served": served,
                               "peft": expected})
    summary = {"adapter": adapter, "loglikelihood_requests": requests, "max_relative_error": worst,
               "generations": generations, "mismatches": len(mismatches)}
    return summary, mismatches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="work folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="fastpeft-lm-eval-"))
    os.makedirs(work, exist_ok=True)
    from transformers import AutoTokenizer

    import lm_eval

    model_dir = save_model_and_adapters(work)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Offline, and the datasets cache inside the work folder.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=os.path.join(work, "hf"),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    process, url = start_server(model_dir, os.path.join(work, "adapters"), os.path.join(work, "server.log"))
    try:
        samples = {adapter: run_lm_eval(url, adapter, batch_size, model_dir, os.path.join(work, "lm-eval", adapter),
                                        env)
                   for adapter, batch_size in ADAPTERS.items()}
    finally:
        process.terminate()
        process.communicate(timeout=60)
    results, failed = [], False
    for adapter, batch_size in ADAPTERS.items():
        summary, mismatches = compare(adapter, os.path.join(work, "adapters", adapter), samples[adapter], tokenizer)
        summary["batch_size"] = batch_size
        results.append(summary)
        for mismatch in mismatches:
            print(f"MISMATCH {adapter}: {json.dumps(mismatch, ensure_ascii=False)}")
        failed |= bool(mismatches) or summary["loglikelihood_requests"] == 0 or summary["generations"] == 0
    versions = {name: __import__(name).__version__ for name in ("torch", "transformers", "peft")}
    versions["lm_eval"] = lm_eval.__version__
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump({"versions": versions, "results": results}, f, indent=2)
    print(f"lm-eval {versions['lm_eval']} local-completions vs PEFT {versions['peft']} forward "
          f"(transformers {versions['transformers']}, torch {versions['torch']}); work folder {work}")
    for summary in results:
        print(f"  {summary['adapter']:>6} (batch_size {summary['batch_size']}): "
              f"{summary['loglikelihood_requests']} log-likelihoods, max relative error "
              f"{summary['max_relative_error']:.2e} (limit {RELATIVE_TOLERANCE:.0e}); {summary['generations']} "
              f"generations; {summary['mismatches']} mismatch(es)")
    print("FAILED" if failed else "PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
