"""Compare a plain-PEFT run of PEFT's prompt-learning tests with an accelerated one (``.ci/run-peft-suite``).

    python summarize.py compare BASELINE.xml ACCELERATED.xml --json SUMMARY.json [--all-versions ALL.json]
    python summarize.py table ALL.json

``compare`` reads the two JUnit XML files the harness wrote (``peft_conftest.py``: the versions as suite properties,
and per test what it did with fastpeft), prints the comparison and writes it as JSON; with ``--all-versions`` it
also files it in that JSON file under its "transformers X / peft Y" key, beside the other versions' runs. Exit
status 1 when a test plain PEFT passes fails accelerated (a regression). ``table`` prints the runs filed in ALL.json
as the README's table.

Per accelerated test that ran (passed or failed), what reached attention, from what ran, never from its config:
* ``fastpeft_kernels``: fastpeft's attention ran on a fused backend (``sdpa``, ``triton`` or ``cuda``) at least once;
* ``fastpeft_reference_only``: it ran, but only on fastpeft's unfused PyTorch path (attention dropout while
  training, or a case no fused path covers);
* ``fallback``: no fastpeft attention, and ``accelerate`` left a model on PEFT's own path (``FallbackWarning``);
* ``never_reached``: neither: no forward through an accelerated model (config, save/load, refusal tests...), split
  into tests that built no prompt-learning model at all and tests that built one but ran no attention through it (no
  forward, or ``accelerate`` refused it).
"""

import argparse
import collections
import datetime
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

FUSED_BACKENDS = ("sdpa", "triton", "cuda")


class TestRecord:
    """One testcase of a JUnit file: outcome, the first line of its failure, and the harness's fastpeft properties."""

    def __init__(self, case):
        self.outcome, self.error = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                self.outcome = "failed"
                self.error = self.error or _first_line(child)
            elif child.tag == "skipped" and self.outcome == "passed":
                self.outcome = "skipped"
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        self.attention = collections.Counter()
        for part in filter(None, properties.get("fastpeft_attention", "").split(",")):
            backend, count = part.split("=")
            self.attention[backend] += int(count)
        self.models = int(properties.get("fastpeft_models", 0))
        self.fallback = properties.get("fastpeft_fallback")

    def attention_category(self):
        if any(self.attention[backend] for backend in FUSED_BACKENDS):
            return "fastpeft_kernels"
        if self.attention:
            return "fastpeft_reference_only"
        if self.fallback is not None:
            return "fallback"
        return "never_reached"


def _first_line(element):
    """The exception line of a failure: pytest's message attribute, else (empty, or only "collection failure") the
    first 'E   ' line of the traceback."""
    message = (element.get("message") or "").strip()
    if message in ("", "collection failure"):
        lines = [line[1:].strip() for line in (element.text or "").splitlines() if line.startswith("E ")]
        message = lines[0] if lines else (element.text or "").strip()
    first = message.splitlines()[0] if message else ""
    return re.sub(r" at 0x[0-9a-f]+", "", first)[:200]


def _node_id(case):
    """pytest's node id (``tests/test_x.py::TestClass::test_y[param]``) from JUnit's dotted classname and name; a
    record of a whole file (a collection error, a skipped module) has no classname and the dotted module as name."""
    if not case.get("classname"):
        return case.get("name").replace(".", "/") + ".py"
    parts = case.get("classname").split(".")
    module_end = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1) + 1
    return "::".join(["/".join(parts[:module_end]) + ".py", *parts[module_end:], case.get("name")])


def read_run(path):
    """(suite properties, {node id: TestRecord}, [files that could not be collected, with why])."""
    root = ET.parse(path).getroot()
    suite_properties = {}
    for suite in root.iter("testsuite"):
        for prop in suite.findall("properties/property"):
            suite_properties[prop.get("name")] = prop.get("value")
    tests, not_collected = {}, []
    for case in root.iter("testcase"):
        record = TestRecord(case)
        if not case.get("classname") and record.outcome == "failed":  # a file that could not be collected
            not_collected.append(f"{_node_id(case)}: {record.error}")
        else:
            tests[_node_id(case)] = record
    return suite_properties, tests, not_collected


def _outcomes(tests):
    counts = collections.Counter(test.outcome for test in tests.values())
    return {outcome: counts[outcome] for outcome in ("passed", "failed", "skipped")}


def compare(baseline_path, accelerated_path):
    """The comparison of the two runs, as the JSON-ready dict ``compare`` writes."""
    _, baseline, baseline_not_collected = read_run(baseline_path)
    versions, accelerated, not_collected = read_run(accelerated_path)
    plain_passes = [name for name, test in baseline.items() if test.outcome == "passed"]
    regressions = [name for name in plain_passes if name not in accelerated or accelerated[name].outcome != "passed"]
    ran = {name: test for name, test in accelerated.items() if test.outcome != "skipped"}
    categories = {name: test.attention_category() for name, test in ran.items()}
    on_kernels = [test for name, test in ran.items() if categories[name] == "fastpeft_kernels"]
    kernel_backends = collections.Counter(backend for test in on_kernels for backend in FUSED_BACKENDS
                                          if test.attention[backend])
    never = [name for name, category in categories.items() if category == "never_reached"]
    return {
        "transformers": versions.get("transformers_version"),
        "peft": versions.get("peft_version"),
        "torch": versions.get("torch_version"),
        "mode": versions.get("fastpeft_peft_suite_mode"),
        "date": datetime.date.fromtimestamp(os.path.getmtime(accelerated_path)).isoformat(),
        "plain": _outcomes(baseline),
        "accelerated": _outcomes(accelerated),
        "not_collected": sorted(set(baseline_not_collected) | set(not_collected)),
        "plain_passes": len(plain_passes),
        "plain_passes_kept": len(plain_passes) - len(regressions),
        "regressions": [{"test": name, "error": accelerated[name].error if name in accelerated else "not run"}
                        for name in regressions],
        "accelerated_only_passes": sorted(name for name, test in accelerated.items() if test.outcome == "passed"
                                          and baseline.get(name) is not None and baseline[name].outcome == "failed"),
        "attention": {
            "tests_run": len(ran),
            **{category: sum(1 for c in categories.values() if c == category)
               for category in ("fastpeft_kernels", "fastpeft_reference_only", "fallback", "never_reached")},
            "fastpeft_kernels_passed": sum(1 for test in on_kernels if test.outcome == "passed"),
            "fastpeft_kernels_by_backend": dict(kernel_backends),
            "never_reached_without_model": sum(1 for name in never if ran[name].models == 0),
        },
        "fallback_reasons": dict(collections.Counter(test.fallback for name, test in ran.items()
                                                     if categories[name] == "fallback").most_common()),
    }


def _counts(outcomes):
    return f"{outcomes['passed']} passed, {outcomes['failed']} failed, {outcomes['skipped']} skipped"


def print_summary(summary):
    attention = summary["attention"]
    kept, passes = summary["plain_passes_kept"], summary["plain_passes"]
    print(f"== transformers {summary['transformers']} | peft {summary['peft']} | torch {summary['torch']} | "
          f"mode {summary['mode']}")
    print(f"   plain PEFT:   {_counts(summary['plain'])}")
    print(f"   accelerated:  {_counts(summary['accelerated'])}")
    for entry in summary["not_collected"]:
        print(f"   not collected (both modes): {entry}")
    print(f"   plain passes kept: {kept} of {passes} ({100 * kept / max(passes, 1):.1f}%); "
          f"{len(summary['accelerated_only_passes'])} tests pass accelerated only")
    print(f"   regressions ({len(summary['regressions'])}): tests plain PEFT passes that fail accelerated")
    for regression in summary["regressions"]:
        print(f"      {regression['test']}\n         {regression['error']}")
    backends = ", ".join(f"{backend} {n}" for backend, n in sorted(attention["fastpeft_kernels_by_backend"].items()))
    print(f"   attention of the {attention['tests_run']} accelerated tests that ran (observed per test):")
    print(f"      {attention['fastpeft_kernels']:5d}  on fastpeft's kernels ({backends or 'none'}), "
          f"{attention['fastpeft_kernels_passed']} of them passed")
    print(f"      {attention['fastpeft_reference_only']:5d}  on fastpeft's reference path only")
    print(f"      {attention['fallback']:5d}  on PEFT's own path after a FallbackWarning:")
    for reason, count in summary["fallback_reasons"].items():
        print(f"         {count:5d}  {reason}")
    without_model = attention["never_reached_without_model"]
    print(f"      {attention['never_reached']:5d}  never reached attention: {without_model} built no prompt-learning "
          f"model, {attention['never_reached'] - without_model} ran none through theirs (no forward, or a refusal)")


def _file_under_version(all_versions_path, summary):
    runs = {}
    if os.path.exists(all_versions_path):
        with open(all_versions_path) as f:
            runs = json.load(f)
    runs[f"transformers {summary['transformers']} / peft {summary['peft']}"] = summary
    with open(all_versions_path, "w") as f:
        json.dump(dict(sorted(runs.items())), f, indent=1)


def print_table(all_versions_path):
    with open(all_versions_path) as f:
        runs = json.load(f)
    print("| transformers / PEFT | plain PEFT | accelerated | plain passes kept | regressions | on fastpeft's kernels "
          "| fastpeft reference only | fallback (PEFT's path) | never reach attention |")
    print("|---|---|---|---|---|---|---|---|---|")
    for summary in runs.values():
        attention = summary["attention"]
        print(f"| {summary['transformers']} / {summary['peft']} | {_counts(summary['plain'])} | "
              f"{_counts(summary['accelerated'])} | {summary['plain_passes_kept']} of {summary['plain_passes']} | "
              f"{len(summary['regressions'])} | {attention['fastpeft_kernels']} | "
              f"{attention['fastpeft_reference_only']} | {attention['fallback']} | {attention['never_reached']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("baseline")
    compare_parser.add_argument("accelerated")
    compare_parser.add_argument("--json", required=True, help="where to write this comparison")
    compare_parser.add_argument("--all-versions", help="JSON file of every version's comparison, updated")
    table_parser = commands.add_parser("table")
    table_parser.add_argument("all_versions")
    args = parser.parse_args(argv)
    if args.command == "table":
        print_table(args.all_versions)
        return 0
    summary = compare(args.baseline, args.accelerated)
    print_summary(summary)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    if args.all_versions:
        _file_under_version(args.all_versions, summary)
    return 1 if summary["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
