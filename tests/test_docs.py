"""The docs stay true: every code and test reference in README.md and docs/ resolves, every key a short run writes to
metrics.jsonl is explained in docs/metrics.md, and the plugin printed in docs/extending.md trains."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, metric_rows

DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
CODE_REF = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py):([\w.]+)`")  # `file.py:function` or `file.py:Class.method`
TEST_REF = re.compile(r"((?:[\w-]+/)*test_\w+\.py)::(\w+)")  # tests/test_x.py::test_name


def read(path):
    with open(path) as f:
        return f.read()


def defines(path, name):
    """True if the Python file at `path` defines `name` (a function, a class, or Class.method)."""
    src = read(path)
    *outer, last = name.split(".")
    return bool(re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{last}\b", src, re.M)) and all(
        re.search(rf"^class\s+{o}\b", src, re.M) for o in outer)


def test_readme_is_the_front_door():
    assert len(read(DOCS[0]).splitlines()) <= 200
    for page in ("method", "implementation-details", "metrics", "exercises", "extending"):
        assert os.path.exists(os.path.join(ROOT, "docs", f"{page}.md")), page


@pytest.mark.parametrize("doc", DOCS, ids=os.path.basename)
def test_every_code_and_test_reference_resolves(doc):
    text, missing = read(doc), []
    refs = [(m.group(1), m.group(2)) for m in CODE_REF.finditer(text)] + [(m.group(1), m.group(2)) for m in TEST_REF.finditer(text)]
    for file, name in refs:
        path = os.path.join(ROOT, file)
        if not os.path.exists(path) or not defines(path, name):
            missing.append(f"{file}:{name}")
    assert not missing, f"{os.path.basename(doc)} names what the code does not define: {missing}"
    if doc.endswith("implementation-details.md"):  # at least 20 numbered details, each naming its test
        details = re.split(r"^### ", text, flags=re.M)[1:]
        assert len(details) >= 20 and all(re.match(r"\d+\. ", d) for d in details)
        assert all(TEST_REF.search(d) and CODE_REF.search(d) for d in details), \
            [d.splitlines()[0] for d in details if not (TEST_REF.search(d) and CODE_REF.search(d))]


def slug(heading):
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=os.path.basename)
def test_every_link_to_a_file_or_an_anchor_resolves(doc):
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(full):
            missing.append(target)
        elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.*)$", read(full), re.M)}:
            missing.append(target)
    assert not missing, f"{os.path.basename(doc)} links to what does not exist: {missing}"


def test_the_reference_check_can_fail(tmp_path):
    """The resolver above rejects a renamed function and a missing test."""
    assert defines(os.path.join(ROOT, "credit.py"), "step_gae") and defines(os.path.join(ROOT, "credit.py"), "Estimator")
    assert not defines(os.path.join(ROOT, "credit.py"), "step_gae_renamed")
    assert not defines(os.path.join(ROOT, "tests", "test_credit.py"), "test_that_does_not_exist")
    assert slug("Learning comparison (`bench/bench_learning.py`)") == "learning-comparison-benchbench_learningpy"


def test_every_metric_a_run_writes_is_in_metrics_md(tmp_path):
    import train
    from test_train import TINY
    documented = set(re.findall(r"^\| `(\w+)`", read(os.path.join(ROOT, "docs", "metrics.md")), re.M))
    seen = set()
    for name, flags in (("step", []), ("token", ["--loss", "token", "--bootstrap", "--tis-cap", "2"])):
        out = str(tmp_path / name)
        train.main(train.parse_config(TINY + ["--out", out, *flags]))
        seen |= {k for row in metric_rows(out) for k in row}
    assert {"dual_clipfrac", "kl_ref", "engine_kl", "clipfrac"} <= seen
    patterns = re.findall(r"^\| `(\w+)_<type>`", read(os.path.join(ROOT, "docs", "metrics.md")), re.M)
    assert any(k.startswith("eval_success_rate_hops") for k in seen)  # multihop declares its task types
    typed = {k for k in seen if any(k.startswith(p + "_") for p in patterns)}
    assert not seen - documented - typed, f"docs/metrics.md does not explain {sorted(seen - documented - typed)}"


def test_the_plugin_in_extending_md_trains(tmp_path):
    text = read(os.path.join(ROOT, "docs", "extending.md"))
    code = re.search(r"<!-- plugin: guess_number.py -->\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "guess_number.py").write_text(code)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--env", "guess_number:GuessNumberEnv",
                        "--env-kwargs", '{"high": 16}', "--iters", "1", "--envs-per-iter", "8", "--sft-steps", "20",
                        "--sft-episodes", "16", "--eval-episodes", "4", "--out", str(tmp_path / "run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metric_rows(str(tmp_path / "run"))
    assert [r["iter"] for r in rows] == [0, 1] and rows[0]["mean_steps"] >= 1  # --iters 1: a training row, an eval row
    assert "warm start: 20 steps on 16 expert episodes (16 won)" in r.stdout  # the expert wins every task


def test_every_flag_is_in_the_docs():
    """Each Config field's flag is explained somewhere in docs/ or the README (beside --help's line)."""
    import dataclasses
    import glob
    import train
    text = "".join(read(f) for f in glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "README.md")])
    missing = [f.name for f in dataclasses.fields(train.Config) if "--" + f.name.replace("_", "-") not in text]
    assert not missing, f"flags no doc mentions: {missing}"
