"""The run's episodes (episodes.jsonl) hold the numbers the update used, and the page (report.py) renders them in a
real browser from disk, with no network request."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import report
import learner
import train
from conftest import metric_rows

FLAGS = ["--iters", "2", "--envs-per-iter", "8", "--group-size", "2", "--minibatch-size", "2", "--max-steps", "3",
         "--max-new-tokens", "10", "--sft-steps", "3", "--sft-episodes", "4", "--eval-episodes", "3", "--eval-every", "1",
         "--env-kwargs", '{"invalid_penalty": 0.1}']


def episodes(out):
    with open(os.path.join(out, "episodes.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_episodes_hold_the_numbers_the_update_used(tmp_path, monkeypatch):
    """Every field is there; each logged step's V, advantage, return, ratio and clipped are the update's own (those on
    its micro-batches), the clipped flags average to the iteration's clipfrac, and a resumed run's file holds each
    iteration's episodes once."""
    seen, real = [], learner.update
    monkeypatch.setattr(train, "update", lambda cfg, *a, **k: seen.append(a[-2]) or real(cfg, *a, **k))
    out = str(tmp_path / "run")
    train.main(train.parse_config([*FLAGS, "--log-groups", "4", "--out", out]))
    eps, rows = episodes(out), metric_rows(out)
    train_eps = [e for e in eps if e["split"] == "train"]
    assert [e["iter"] for e in train_eps] == [0] * 8 + [1] * 8  # 4 groups of 2, every iteration
    assert sorted({e["iter"] for e in eps if e["split"] == "eval"}) == [0, 1, 2]
    step_keys = {"observation", "action", "tokens", "cut", "invalid", "reward", "value", "advantage", "return", "ratio",
                 "clipped", "logprob", "engine_logprob", "engine_kl"}
    for e in eps:
        assert {"iter", "split", "task_id", "seed", "success", "score", "total_reward", "end", "error", "turns",
                "steps"} <= set(e) and e["turns"] == len(e["steps"]) and e["end"] in ("terminated", "step_limit")
        assert all(step_keys <= set(s) for s in e["steps"]) if e["split"] == "train" else True
    for it, batches in enumerate(seen):
        mine = [e for e in train_eps if e["iter"] == it]
        per_minibatch = []
        for micro in batches:
            flags = []
            for m in micro:
                for k, (g, s) in enumerate(zip(m.gi.tolist(), m.si.tolist())):
                    step = mine[g]["steps"][s]
                    for name, key in (("value", "v_step"), ("advantage", "adv_step"), ("return", "ret_step"),
                                      ("ratio", "ratio"), ("clipped", "clipped")):
                        assert step[name] == pytest.approx(m.out[key][k].item(), rel=1e-4, abs=1e-6), (it, g, s, name)
                    flags.append(step["clipped"])
            per_minibatch.append(sum(flags) / len(flags))
        assert rows[it]["clipfrac"] == pytest.approx(sum(per_minibatch) / len(per_minibatch), abs=1e-6)
        first = [mine[g]["steps"][s]["ratio"] for m in batches[0] for g, s in zip(m.gi.tolist(), m.si.tolist())]
        assert all(r == 1.0 for r in first)  # pi_old is the first minibatch's own forward
    train.main(train.parse_config([*FLAGS, "--log-groups", "4", "--out", out, "--iters", "3", "--resume"]))
    again = episodes(out)
    assert [e["iter"] for e in again if e["split"] == "train"] == [0] * 8 + [1] * 8 + [2] * 8
    assert sorted(e["iter"] for e in again if e["split"] == "eval") == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no Chromium (apt-get install chromium; .ci/run installs it)")
def test_the_page_renders_the_chosen_iterations_episodes_in_a_real_browser(tmp_path):
    out = str(tmp_path / "run")
    train.main(train.parse_config([*FLAGS, "--out", out]))
    path = os.path.join(out, "report.html")
    html = open(path).read()
    assert "default-src 'none'" in html  # the browser refuses any request the page could make
    assert not any(f'{a}="http' in html or f"{a}='http" in html for a in ("src", "href", "action"))
    r = subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", "file://" + path],
                       capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert '<div id="errors"></div>' in dom, (dom[:500], r.stderr[-2000:])  # the script ran without an error
    shown = [e for e in episodes(out) if e["split"] == "train" and e["iter"] == 1]  # the latest training iteration
    assert dom.count('class="ep') == len(shown) == 4  # --log-groups 2 of --group-size 2
    episode = dom.split('<div id="episode">')[1].split("<script>")[0]  # the rendered episode, not the page's data
    assert "| A " in episode and "| A - |" not in episode and "ratio - " not in episode  # training: every step's credit
    assert "Its task group" in dom and "system prompt" in dom and dom.count("<svg") >= 5


def test_report_py_writes_a_page_for_any_run_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    path = report.write(str(out))  # no records yet: a page all the same
    assert os.path.getsize(path) > 1000
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(report.__file__), "report.py"), str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "usage" in r.stderr
