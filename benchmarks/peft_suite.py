"""How much of PEFT's own LoRA test suite passes on lorakit.

The script downloads the pinned PEFT sdist (peft==0.21.2) from PyPI, unpacks its tests/ folder and runs the
LoRA cases of tests/test_custom_models.py under pytest:

1. with the real, installed PEFT (it must be the sdist's version): the baseline;
2. through an import-only shim that points a few PEFT names at lorakit's objects, nothing else.

It prints the number of LoRA cases, how many pass with real PEFT, how many of THOSE pass on lorakit, and the
lorakit failures grouped by cause (exception type + normalised first line of its message), by test function,
by model kind (the `model_id` parameter: MLP, EmbConv1D, Conv2d, ...), by test case (the TEST_CASES name,
e.g. "Vanilla MLP 7 LoRA with DoRA") and by the innermost lorakit/peft/test frame, largest first. It writes
benchmarks/results/peft-suite.json (per-test outcomes of the runs) and benchmarks/results/peft-suite.md.

Run it from the repository root with the project venv's python (torch, transformers and pytest; the suite's
venv gets peft==0.21.2 when the project venv has another version):

    .venv/bin/python benchmarks/peft_suite.py                   # all runs: ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/peft_suite.py -k "MLP"          # a subset (ANDed with the LoRA selection)
    .venv/bin/python benchmarks/peft_suite.py --only lorakit    # rerun lorakit, reuse the cached PEFT run
    .venv/bin/python benchmarks/peft_suite.py --report          # run nothing; report the cached runs
    .venv/bin/python benchmarks/peft_suite.py --jobs 2          # pytest-xdist workers

The cache (~/.cache/lorakit/peft-suite, or --cache) holds the sdist, the unpacked suite, a small venv for the
packages the suite needs that the project venv lacks (diffusers and datasets, imported at module level by
testing_common.py and testing_utils.py; pytest-xdist for --jobs; peft==0.21.2 if need be), and each run's
raw results and log. That venv is layered over the running interpreter's site-packages by a .pth file, so
torch, transformers, peft and pytest are the very same in every run.

Which cases ("LoRA cases"): the pytest -k expression LORA_SELECTION below picks
  * every test parametrized with LoraConfig as its config class: the id holds the class name as a whole
    parameter ("-LoraConfig-" or "-LoraConfig]"); -k matches substrings case-insensitively, and the dashes
    keep out AdaLoraConfig, GloraConfig, DeloraConfig, ... whose names end in "LoraConfig";
  * tests that are LoRA-only by name: "_lora_" in the function name (test_lora_..., test_repr_lora_...,
    test_mixed_adapter_batches_lora_...) or a case name starting "LoRA" ("[LoRA mixed adapter ..."), less
    the RoAd and GLoRA cases that share such a function.
  Other methods (LoHa, LoKr, VeRA, ...) never match. In PEFT 0.21.2 that is 2,676 of 19,485 tests.

The shim (lorakit runs only). The rule: it maps names only; no test is edited, skipped or special-cased.
Loaded into the suite's pytest as the plugin `-p peft_suite` (this file), it reads the suite's files
(test_custom_models.py, testing_*.py) and, before pytest imports them, rebinds each name of MAPPED_NAMES
that lorakit exports exactly where the suite looks it up: in the module the suite imports it from
(`from peft import LoraConfig` -> peft.LoraConfig) or reads it off (`from peft.tuners import lora`, then
`lora.LoraLayer` -> peft.tuners.lora.LoraLayer). PEFT's internal bindings are left alone, so the PEFT code the
suite still runs (other tuners' configs, utilities) is unchanged: rebinding TaskType inside peft.config,
for one, breaks RoadConfig, whose __post_init__ iterates PEFT's TaskType enum. A name lorakit lacks stays
PEFT's (the figure grows as lorakit grows); the report lists the names and the sites mapped. With PEFT
0.21.2 and this lorakit that is five sites: peft.LoraConfig, peft.get_peft_model, peft.PeftModel,
peft.TaskType and peft.tuners.lora.LoraLayer. PeftModelFor* and LoraModel are exported by lorakit but not
looked up by this suite; get_peft_model_state_dict, set_peft_model_state_dict, inject_adapter_in_model,
get_base_model_state_dict and set_base_model_state_dict are looked up but lorakit lacks them, so the tests
call PEFT's own functions on lorakit's objects.

When the test module cannot even be imported under the shim (a collection error: today a class-level
`LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False)` without target_modules, which lorakit rejects
at construction), no test runs: that is the strict figure, and it is reported as such. To still see each
test's outcome, the script then reruns with that error deferred: while pytest imports the test module only,
a LoraConfig whose construction raises becomes a stand-in that raises the same error when used, so it fails
exactly the tests that use it. That per-test figure is labelled as such in the report. Today the two
failing configs belong to test_mixed_adapter_batches_lora_opt_timing, which needs an accelerator and is
skipped in every run, so the per-test figure is exactly lorakit's result on all the other tests.

Other deliberate choices: the sdist ships tests/ without __init__.py (the tests import their helpers
relatively) and without conftest.py (upstream it only asserts HF_TOKEN is set and skips tests marked
`regression`, none of them selected), so the script adds an empty tests/__init__.py. Every run sets
HF_HUB_OFFLINE=1: there is no network here, so tests that need the Hub fail fast in the PEFT run and drop
out of the comparison. The PEFT sdist is never committed.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import datetime
import json
import os
import re
import site
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

PEFT_VERSION = "0.21.2"
TEST_FILE = "tests/test_custom_models.py"
LORA_SELECTION = "(-LoraConfig- or -LoraConfig] or [LoRA or _lora_) and not ([RoAd or [GLoRA)"

# The shim's names. One lorakit does not export is left as PEFT's.
MAPPED_NAMES = (
    "LoraConfig", "get_peft_model", "PeftModel",
    "PeftModelForCausalLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PeftModelForSeq2SeqLM", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
    "LoraModel", "LoraLayer", "TaskType", "TrainableTokensWrapper",
    # not exported by lorakit yet; mapped as soon as it does:
    "get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model",
    "get_base_model_state_dict", "set_base_model_state_dict",
)

# Packages the suite needs that the project venv may lack: diffusers and datasets are imported at module
# level by testing_common.py and testing_utils.py. Pinned so that reruns import the same code.
SUITE_DEPS = (f"peft=={PEFT_VERSION}", "diffusers==0.42.1", "datasets==5.2.0")
XDIST_DEP = "pytest-xdist==3.8.0"

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# name -> (shim on, import-time config errors deferred)
RUNS = {"peft": (False, False), "lorakit": (True, False), "lorakit-deferred": (True, True)}
TOP = 25  # groups shown per table


# ================================================================================================
# Part 1: the runner (command line)
# ================================================================================================

def fetch_suite(cache: Path) -> Path:
    """Download and unpack the PEFT sdist once; return the unpacked folder (the pytest rootdir)."""
    root = cache / f"peft-{PEFT_VERSION}"
    sdist = cache / f"peft-{PEFT_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", f"peft=={PEFT_VERSION}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(cache), "-q"], check=True)
    if not (root / TEST_FILE).exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    # The sdist drops tests/__init__.py; the tests import their helpers as `from .testing_common import`.
    (root / "tests" / "__init__.py").touch()
    missing = [m for m in suite_helpers(root) if not (root / "tests" / f"{m}.py").exists()]
    if missing:
        raise SystemExit(f"the sdist lacks helper modules the test file imports: {missing}")
    return root


def suite_helpers(root: Path) -> list[str]:
    """The tests/ modules test_custom_models.py imports relatively, followed transitively."""
    found, todo = [], [Path(TEST_FILE).stem]
    while todo:
        tree = ast.parse((root / "tests" / f"{todo.pop()}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module not in found:
                found.append(node.module)
                if (root / "tests" / f"{node.module}.py").exists():
                    todo.append(node.module)
    return found


def run_env(cache: Path, jobs: int) -> Path:
    """A venv for the suite: the running interpreter's packages plus SUITE_DEPS; returns its python."""
    venv = cache / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        # Layer the project venv under it (.pth entries come after the venv's own site-packages, so only
        # the added packages are new): torch, transformers, peft and pytest stay exactly the project's.
        own = subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                      text=True).strip()
        (Path(own) / "zz-project-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wanted = list(SUITE_DEPS) + ([XDIST_DEP] if jobs > 1 else [])
    stamp = venv / "installed.txt"
    have = stamp.read_text().split() if stamp.exists() else []
    if not set(wanted) <= set(have):
        subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True)
        stamp.write_text("\n".join(sorted(set(have) | set(wanted))) + "\n")
    version = subprocess.check_output([str(python), "-c", "import peft; print(peft.__version__)"], text=True)
    if version.strip() != PEFT_VERSION:  # the baseline must be the very version whose tests are run
        raise SystemExit(f"the suite's venv has peft {version.strip()}, not {PEFT_VERSION}: delete {venv}")
    return python


def run_suite(name: str, python: Path, root: Path, cache: Path, expr: str, jobs: int) -> dict:
    """One pytest run of the selected cases (RUNS[name] says shim/deferral); saved and returned."""
    shim, defer = RUNS[name]
    runs = cache / "runs"
    runs.mkdir(exist_ok=True)
    record, log = runs / f"{name}.jsonl", runs / f"{name}.log"
    record.unlink(missing_ok=True)
    path = [REPO / "benchmarks"] + ([REPO / "src"] if shim else [])  # this checkout's lorakit comes first
    env = dict(os.environ, PEFT_SUITE_RECORD=str(record), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=os.pathsep.join(map(str, path)),
               PEFT_SUITE_SHIM=str(int(shim)), PEFT_SUITE_DEFER=str(int(defer)))
    # Waiting OpenMP threads sleep instead of spinning: much faster on a shared CPU (as in the Makefile).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if jobs > 1:  # one torch thread per worker: the workers share the cores
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [str(python), "-m", "pytest", TEST_FILE, "-k", expr, "-p", "peft_suite", "-p", "no:cacheprovider",
           "-o", "addopts=", "-q", "--tb=no"] + (["-n", str(jobs)] if jobs > 1 else [])
    print(f"[{name}] pytest {TEST_FILE} -k {expr!r}  (log: {log})", flush=True)
    start = time.time()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    run = {"meta": {"selection": expr, "seconds": round(time.time() - start), "pytest_rc": rc, "jobs": jobs,
                    "collection_errors": []}, "tests": {}}
    if record.exists():
        merge_records(run, record)
    # 0: all passed, 1: some failed, 2: interrupted, which is a result only when collection failed
    if not record.exists() or rc not in (0, 1) and not (rc == 2 and run["meta"]["collection_errors"]):
        raise SystemExit(f"[{name}] pytest exited {rc}; see {log}")
    (runs / f"{name}.json").write_text(json.dumps(run))
    errors = run["meta"]["collection_errors"]
    print(f"[{name}] {len(run['tests'])} tests in {run['meta']['seconds']} s"
          + (f"; collection error: {errors[0]['cause']}" if errors else ""), flush=True)
    return run


def merge_records(run: dict, record: Path) -> None:
    """Fold the plugin's lines (one per test phase, plus shim and collection lines) into one outcome a test."""
    tests = run["tests"]
    for line in record.read_text().splitlines():
        rec = json.loads(line)
        if "shim" in rec:
            run["meta"]["shim"] = rec["shim"]
            continue
        if "collect_error" in rec:  # every xdist worker collects, and reports, the same error
            error = {"node": rec["collect_error"], "cause": rec["cause"]}
            if error not in run["meta"]["collection_errors"]:
                run["meta"]["collection_errors"].append(error)
            continue
        test = tests.setdefault(rec["id"], {"outcome": "passed", **rec.get("params", {})})
        if test["outcome"] in ("failed", "error"):  # the first failure is the cause
            continue
        if rec["outcome"] == "failed":
            test["outcome"] = "failed" if rec["when"] == "call" else "error"
            test.update({k: rec[k] for k in ("cause", "where") if k in rec})
        elif rec["outcome"] == "skipped":
            test["outcome"] = "xfailed" if rec.get("xfail") else "skipped"
            test["cause"] = rec.get("cause", "")


def load_run(cache: Path, name: str) -> dict | None:
    path = cache / "runs" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def collect_runs(args, expr: str) -> dict:
    """Run what was asked, load the rest from the cache; the deferred run only when the strict one needs it."""
    runs = {}
    if not args.report:
        root, python = fetch_suite(args.cache), run_env(args.cache, args.jobs)
        wanted = [n for n in RUNS if args.only in (None, n.split("-")[0])]
        for name in wanted:
            needed = name != "lorakit-deferred" or runs["lorakit"]["meta"]["collection_errors"]
            if needed:
                runs[name] = run_suite(name, python, root, args.cache, expr, args.jobs)
    for name in RUNS:
        if name not in runs:
            runs[name] = load_run(args.cache, name)
    if runs["peft"] is None or runs["lorakit"] is None:
        raise SystemExit(f"no cached peft/lorakit run in {args.cache / 'runs'}: run without --only/--report")
    if not runs["lorakit"]["meta"]["collection_errors"]:
        runs["lorakit-deferred"] = None  # the strict run ran every test; an older deferred run is stale
    return runs


# ------------------------------------------------------------------------------------------------
# Comparing and grouping
# ------------------------------------------------------------------------------------------------

def normalize_cause(cause: str, where: str = "") -> str:
    """One group per kind of failure: numbers, addresses, paths, the insides of brackets (reprs of configs,
    tensors, lists) and long tails do not split groups. A bare assertion is told apart by where it failed."""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", cause)
    text = re.sub(r"(/[\w.\-]+)+/", "…/", text)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    # long bracketed values (reprs of configs, tensors, lists); short ones such as "(Conv2d)" stay
    for pattern, stub in ((r"\([^()]{16,}\)", "(…)"), (r"\[[^\[\]]{16,}\]", "[…]"), (r"\{[^{}]{16,}\}", "{…}")):
        for _ in range(3):  # innermost first, so nested brackets collapse too
            text = re.sub(pattern, stub, text)
    if where and "AssertionError" in text:
        text = f"{text.strip()} (at {where})"
    return text if len(text) <= 160 else text[:159] + "…"


def short_id(nodeid: str) -> str:
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid


def func_name(test_id: str) -> str:
    return test_id.rsplit("::", 1)[-1].split("[", 1)[0]


def compare(runs: dict) -> dict:
    """Per-test outcomes over the tests the PEFT run selected; a lorakit run that could not import the test
    module gives each of them its collection error."""
    peft, strict, deferred = runs["peft"], runs["lorakit"], runs["lorakit-deferred"]
    per_test = deferred or strict
    errors = strict["meta"]["collection_errors"]
    rows = {}
    for nodeid, p in sorted(peft["tests"].items()):
        l = per_test["tests"].get(nodeid, {"outcome": "not run", "cause": "not selected in the lorakit run"})
        row = {"peft": p["outcome"], "lorakit": l["outcome"], "model": p.get("model", "-"),
               "case": p.get("case", "-")}
        if errors:  # no test ran (the cause is in the summary); the deferred rerun's outcome is kept beside
            row.update(lorakit="error", lorakit_per_test=l["outcome"])
        if p["outcome"] != "passed" and "cause" in p:
            row["peft_cause"] = p["cause"]
        if l["outcome"] != "passed" and "cause" in l:
            row["lorakit_per_test_cause" if errors else "lorakit_cause"] = l["cause"]
        if l.get("where"):
            row["lorakit_where"] = l["where"]
        rows[short_id(nodeid)] = row
    return rows


def group(rows: dict, key) -> list[tuple[str, int, str]]:
    """(group, count, a representative test id), largest first."""
    counts, example = collections.Counter(), {}
    for test_id, row in rows.items():
        k = key(test_id, row)
        counts[k] += 1
        example.setdefault(k, test_id)
    return [(k, n, example[k]) for k, n in counts.most_common()]


def summarize(rows: dict, runs: dict) -> dict:
    """The figures and the failure groups the report prints (groups from the per-test outcomes)."""
    per_test = "lorakit_per_test" if runs["lorakit-deferred"] else "lorakit"
    baseline = {t: r for t, r in rows.items() if r["peft"] == "passed"}
    lost = {t: r for t, r in baseline.items() if r[per_test] != "passed"}
    outside = {t: r for t, r in rows.items() if r["peft"] != "passed"}
    cause = lambda t, r: f"{r[per_test]}: " + normalize_cause(r.get(per_test + "_cause", ""),
                                                              r.get("lorakit_where", ""))
    return {
        "cases": len(rows),
        "peft_outcomes": dict(collections.Counter(r["peft"] for r in rows.values())),
        "peft_pass": len(baseline),
        "lorakit_pass": sum(r["lorakit"] == "passed" for r in baseline.values()),
        "lorakit_collection_errors": runs["lorakit"]["meta"]["collection_errors"],
        "lorakit_pass_per_test": len(baseline) - len(lost) if runs["lorakit-deferred"] else None,
        "lorakit_pass_outside_baseline": sum(r[per_test] == "passed" for r in outside.values()),
        "shim": runs["lorakit"]["meta"].get("shim", {}),
        "by_cause": group(lost, cause),
        "by_function": group(lost, lambda t, r: func_name(t)),
        "by_model": group(lost, lambda t, r: r["model"]),
        "by_case": group(lost, lambda t, r: r["case"]),
        "by_where": group(lost, lambda t, r: r.get("lorakit_where") or "-"),
        "peft_not_passing": group(outside, lambda t, r: f"{r['peft']}: " + normalize_cause(r.get("peft_cause", ""))),
    }


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------

def headline(s: dict) -> list[str]:
    pct = lambda n: f"{100.0 * n / s['peft_pass']:.1f}%" if s["peft_pass"] else "-"
    shim = s["shim"]
    lines = [f"LoRA cases selected:        {s['cases']}",
             f"pass with real PEFT:        {s['peft_pass']}   (PEFT outcomes: {s['peft_outcomes']})",
             f"of those, pass on lorakit:  {s['lorakit_pass']}  ({pct(s['lorakit_pass'])})"]
    for error in s["lorakit_collection_errors"]:
        lines.append(f"  -> no test ran: {error['node']} fails to import under the shim: {error['cause']}")
    if s["lorakit_pass_per_test"] is not None:
        lines.append(f"per test, that import error deferred to the tests that use the failing config: "
                     f"{s['lorakit_pass_per_test']}  ({pct(s['lorakit_pass_per_test'])})")
    lines += [f"lorakit passes among the cases PEFT itself does not pass: {s['lorakit_pass_outside_baseline']}",
              f"names mapped, where the suite looks them up: {', '.join(shim.get('sites', [])) or '?'}",
              f"exported by lorakit, not looked up by the suite: {', '.join(shim.get('unused', [])) or 'none'}",
              f"left as PEFT's (lorakit lacks them): {', '.join(shim.get('missing', [])) or 'none'}"]
    return lines


TABLES = (
    ("by_cause", "lorakit failures by cause", "cause"),
    ("by_function", "lorakit failures by test function", "test function"),
    ("by_model", "lorakit failures by model kind (model_id)", "model"),
    ("by_case", "lorakit failures by test case (TEST_CASES name)", "case"),
    ("by_where", "lorakit failures by the innermost lorakit/peft/test frame", "frame"),
    ("peft_not_passing", "cases that do not pass with real PEFT (left out of the comparison)", "cause"),
)


def print_report(s: dict) -> None:
    print("\n".join(["", *headline(s)]))
    for key, title, _ in TABLES:
        print(f"\n{title} ({sum(n for _, n, _ in s[key])} tests, {len(s[key])} groups):")
        for name, n, example in s[key][:TOP]:
            print(f"  {n:5d}  {name}\n         e.g. {example}")


def markdown(s: dict, meta: dict) -> str:
    lines = ["# PEFT's LoRA test suite on lorakit", "",
             f"PEFT {PEFT_VERSION} `{TEST_FILE}`, cases selected with `-k \"{meta['selection']}\"`; "
             f"lorakit {meta['lorakit_commit']}; {meta['date']}; made by `benchmarks/peft_suite.py`, whose "
             "docstring explains the selection, the shim and the deferred rerun.", "", "```", *headline(s), "```"]
    if s["lorakit_pass_per_test"] is not None:
        lines += ["", "The tables below group the per-test outcomes of the deferred rerun."]
    for key, title, column in TABLES:
        lines += ["", f"## {title}", "", f"{sum(n for _, n, _ in s[key])} tests in {len(s[key])} groups"
                  + (f"; the largest {TOP}:" if len(s[key]) > TOP else ":"), "",
                  f"| tests | {column} | e.g. |", "| ---: | --- | --- |"]
        lines += [f"| {n} | {md_cell(name)} | {md_cell(example)} |" for name, n, example in s[key][:TOP]]
    return "\n".join(lines) + "\n"


def md_cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def write_json(path: Path, rows: dict, s: dict, meta: dict) -> None:
    """Per-test outcomes of the runs; one test per line so that reruns diff readably. Model and case are
    left out: the test id spells both."""
    head = {"meta": meta, "summary": {k: v for k, v in s.items() if not k.startswith(("by_", "peft_not"))}}
    slim = lambda row: {k: v for k, v in row.items() if k not in ("model", "case")}
    body = ",\n".join(f"  {json.dumps(t)}: {json.dumps(slim(r))}" for t, r in rows.items())
    path.write_text(json.dumps(head, indent=1)[:-2] + ',\n "tests": {\n' + body + "\n }\n}\n")


def report_meta(runs: dict) -> dict:
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    return {"peft_version": PEFT_VERSION, "lorakit_commit": commit or "?", "date": datetime.date.today().isoformat(),
            "selection": runs["peft"]["meta"]["selection"], "python": sys.version.split()[0],
            "runs": {name: run["meta"] for name, run in runs.items() if run}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", dest="keyword", help="pytest -k expression, ANDed with the LoRA selection")
    p.add_argument("--only", choices=("peft", "lorakit"), help="run only this; reuse the other's cached run")
    p.add_argument("--report", action="store_true", help="run nothing; report the cached runs")
    p.add_argument("--jobs", type=int, default=1, help="pytest-xdist workers (installs pytest-xdist)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorakit" / "peft-suite")
    p.add_argument("--out", type=Path, default=RESULTS, help="where peft-suite.json and .md go")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    expr = LORA_SELECTION if not args.keyword else f"({LORA_SELECTION}) and ({args.keyword})"
    runs = collect_runs(args, expr)
    rows = compare(runs)
    summary = summarize(rows, runs)
    meta = report_meta(runs)
    print_report(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "peft-suite.json", rows, summary, meta)
    (args.out / "peft-suite.md").write_text(markdown(summary, meta))
    print(f"\nwrote {args.out / 'peft-suite.json'} and {args.out / 'peft-suite.md'}")


# ================================================================================================
# Part 2: the pytest plugin. The runner loads this file into the suite's pytest with `-p peft_suite`;
# it does nothing unless PEFT_SUITE_RECORD is set, so it is inert anywhere else.
# ================================================================================================

def peft_lookups(tests: Path) -> set[tuple[str, str]]:
    """(module, name) for every peft name the suite's files look up: `from M import N`, and `A.N` / `A.B.N`
    where A is an imported peft module (`import peft`; `from peft.tuners import lora`, then lora.LoraLayer)."""
    found = set()
    for path in [tests / Path(TEST_FILE).name, *sorted(tests.glob("testing_*.py"))]:
        tree, aliases = ast.parse(path.read_text()), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:  # `import peft.utils` binds `peft`; `import peft.utils as u` binds `u`
                    if a.name.split(".")[0] == "peft":
                        aliases[a.asname or "peft"] = a.name if a.asname else "peft"
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "peft":
                for a in node.names:
                    found.add((node.module, a.name))
                    if _is_module(f"{node.module}.{a.name}"):
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            dotted = _dotted(node)
            head = dotted and dotted.split(".")[0]
            if head in aliases:
                module, _, name = (aliases[head] + dotted[len(head):]).rpartition(".")
                if module and _is_module(module):
                    found.add((module, name))
    return found


def _is_module(dotted: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, AttributeError, ValueError):  # a name inside a plain module, not a submodule
        return False


def _dotted(node) -> str | None:
    """'a.b.c' for an attribute chain rooted at a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) and parts else None


def install_shim(tests: Path) -> dict:
    """Rebind MAPPED_NAMES to lorakit's objects where the suite looks them up (see the docstring)."""
    import importlib

    import lorakit
    lookups = sorted(peft_lookups(tests))
    sites, unused, missing = [], [], []
    for name in MAPPED_NAMES:
        ours = getattr(lorakit, name, None)
        modules = [importlib.import_module(m) for m, n in lookups if n == name]
        modules = [m for m in modules if hasattr(m, name)]  # one PEFT lacks stays PEFT's ImportError
        if ours is None:
            missing.append(name)
        elif not modules:
            unused.append(name)
        for module in modules if ours is not None else []:
            setattr(module, name, ours)
            sites.append(f"{module.__name__}.{name}")
    return {"sites": sites, "unused": unused, "missing": missing, "lorakit": lorakit.__file__}


class _FailedConfig:
    """What a LoraConfig whose construction raised while the test module was being imported turns into:
    any use of it raises that error, so it fails exactly the tests that use it."""

    def __getattr__(self, name):
        if name.startswith("__") or name == "_error":  # pytest probes __name__ etc. to build test ids
            raise AttributeError(name)
        raise self._error.with_traceback(None)

    def __repr__(self):
        return f"<LoraConfig that failed to construct: {_headline(str(self._error))}>"


@contextlib.contextmanager
def _deferred_config_errors():
    """While a test module is imported, a LoraConfig(...) that raises becomes a _FailedConfig."""
    from lorakit import LoraConfig
    saved = vars(LoraConfig).get("__init__")
    init = LoraConfig.__init__

    def deferring_init(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except Exception as error:
            # the instance exists already (type() made it); turn it into the stand-in
            self.__dict__.clear()
            self.__class__ = _FailedConfig
            self._error = error

    LoraConfig.__init__ = deferring_init
    try:
        yield
    finally:
        if saved is None:
            del LoraConfig.__init__
        else:
            LoraConfig.__init__ = saved


def _headline(message: str) -> str:
    """The first line of an error message, and the next when the first only introduces a list."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or [""]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


_ROOTS: dict[str, str] = {}  # innermost-frame labels: package or folder -> name shown


def _record(line: dict) -> None:
    with open(os.environ["PEFT_SUITE_RECORD"], "a") as out:
        out.write(json.dumps(line) + "\n")


def _active() -> bool:
    return "PEFT_SUITE_RECORD" in os.environ


def _controller() -> bool:
    """True in the process that writes the record (not in an xdist worker)."""
    return _active() and "PYTEST_XDIST_WORKER" not in os.environ


def pytest_configure(config) -> None:
    if not _active():
        return
    import peft
    tests = Path(config.rootpath) / "tests"
    _ROOTS.update({str(Path(peft.__file__).parent): "peft", str(tests): "tests"})
    if os.environ.get("PEFT_SUITE_SHIM") == "1":  # before collection imports the test module
        import lorakit
        _ROOTS[str(Path(lorakit.__file__).parent)] = "lorakit"
        shim = install_shim(tests)
        if _controller():
            _record({"shim": shim})


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    if not (_active() and os.environ.get("PEFT_SUITE_DEFER") == "1" and isinstance(collector, pytest.Module)):
        return (yield)
    with _deferred_config_errors():  # collecting a Module is what imports it
        return (yield)


def pytest_exception_interact(node, call, report) -> None:
    # For a collector this runs before pytest_collectreport, and unlike it sees the exception.
    if _active() and isinstance(node, pytest.Collector) and call.excinfo is not None:
        report.peft_suite = {"cause": f"{call.excinfo.typename}: {_headline(str(call.excinfo.value))[:300]}"}


def pytest_collectreport(report) -> None:
    if _controller() and report.failed:
        cause = (getattr(report, "peft_suite", None) or {}).get("cause") or str(report.longrepr)[:300]
        _record({"collect_error": report.nodeid, "cause": cause})


def _where(excinfo) -> str:
    """The innermost frame in lorakit, peft or the suite's tests: where a failure comes from."""
    for entry in reversed(excinfo.traceback):
        path = str(entry.path)
        if path.endswith(f"lorakit{os.sep}errors.py"):  # lorakit's raise helper: its caller is the place
            continue
        for root, label in _ROOTS.items():
            if path.startswith(root + os.sep):
                return f"{label}/{Path(path).relative_to(root)}:{entry.lineno + 1}"
    return ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if not _active():
        return report
    # Plain attributes of a report travel from xdist workers to the controller; the exception does not.
    params = getattr(getattr(item, "callspec", None), "params", {})
    info = {"params": {k: str(params[p]) for k, p in (("model", "model_id"), ("case", "test_name")) if p in params}}
    if call.excinfo is not None and (report.failed or report.skipped):
        info.update(cause=f"{call.excinfo.typename}: {_headline(str(call.excinfo.value))[:300]}",
                    where=_where(call.excinfo))
    report.peft_suite = info
    return report


def pytest_runtest_logreport(report) -> None:
    if not _controller() or (report.when != "call" and report.outcome == "passed"):
        return
    _record({"id": report.nodeid, "when": report.when, "outcome": report.outcome,
             "xfail": hasattr(report, "wasxfail"), **(getattr(report, "peft_suite", None) or {})})


if __name__ == "__main__":
    main()
