"""A long run loses nothing (docs/scaling.md, "Long runs"): a run folder belongs to one run (lock, --overwrite),
--resume checks its flags, a full disk keeps the checkpoints, bad env values end episodes, failures in a row stop."""
import errno
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import namedtuple

import pytest
import torch

import checkpoint
import run_dir
import scale
import train
from conftest import ROOT, TINY, metric_rows, run, sigterm_after_two_rows, torchrun_train

pytestmark = pytest.mark.usefixtures("one_thread")
def no_models(monkeypatch):
    """Fail the test if a model is loaded: the check must come before."""
    monkeypatch.setattr(scale, "load_models", lambda *a, **k: pytest.fail("a model was loaded before the check"))


def seed_of(ckpt):
    return checkpoint.read_meta(ckpt)["config"]["seed"]


# ------------------------------------------------------------------------------------------ 1, 7: one run per folder
def test_a_new_run_into_another_runs_folder_stops_before_any_model_unless_overwrite(tmp_path, monkeypatch, capsys):
    out, rows = run(tmp_path)
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    with monkeypatch.context() as m:
        no_models(m)
        with pytest.raises(SystemExit, match=r"holds another run \(ckpt-0, ckpt-1, .*--resume.*--overwrite"):
            run(tmp_path, "--estimator", "rloo", "--seed", "7")
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before  # nothing touched
    (tmp_path / "run" / "notes.txt").write_text("the user's own file")
    _, new = run(tmp_path, "--overwrite", "--seed", "7", "--iters", "1")
    assert [r["iter"] for r in new] == [0, 1]
    assert [os.path.basename(c) for c in checkpoint.checkpoints(out)] == ["ckpt-0"] and seed_of(checkpoint.checkpoints(out)[0]) == 7
    assert (tmp_path / "run" / "notes.txt").read_text() == "the user's own file"  # only the old run's files went
    assert len(json.load(open(os.path.join(out, "run.json")))["starts"]) == 1 and not os.path.exists(os.path.join(out, "run.lock"))
    with pytest.raises(SystemExit) as e:
        train.parse_config(TINY + ["--out", out, "--resume", "--overwrite"])
    assert e.value.code == 2 and "--resume continues the run in --out, --overwrite deletes it" in capsys.readouterr().err


def test_a_live_lock_refuses_a_second_job_and_a_stale_one_is_taken_over(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / run_dir.LOCK
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "start": run_dir._started(os.getppid()),
                                "time": "earlier"}))  # a live process of this host
    with monkeypatch.context() as m:
        no_models(m)
        with pytest.raises(SystemExit, match=rf"another job \(pid {os.getppid()} on .*\) is running in"):
            run(tmp_path)
    assert lock.exists()  # obeyed, not removed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for held in ({"pid": dead.pid, "host": socket.gethostname()},  # its process is gone
                 {"pid": os.getpid(), "host": socket.gethostname(), "start": 0.0}):  # a pid reused by a later process
        lock.write_text(json.dumps(held))
        assert run_dir._take_lock(str(out)) is None and json.loads(lock.read_text())["pid"] == os.getpid()
        run_dir.release(str(out))
        assert not lock.exists()
    lock.write_text("{truncated")  # a crash while writing it: stale
    _, rows = run(tmp_path)
    assert [r["iter"] for r in rows] == [0, 1, 2] and not lock.exists()  # released at the end


def test_out_that_is_not_a_writable_folder_is_one_line_before_any_model(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    no_models(monkeypatch)
    with pytest.raises(SystemExit, match=r"--out .*file/run is not a folder this job can write \(NotADirectoryError"):
        train.main(train.parse_config(TINY + ["--out", str(tmp_path / "file" / "run")]))


def model_copy(tmp_path, name="model"):
    from model import resolve
    folder = tmp_path / name
    shutil.copytree(resolve("tiny"), folder)
    return folder


def bad_start(capsys, *flags):
    """parse_config(flags) must stop with exit 2 and one line on stderr; that line."""
    with pytest.raises(SystemExit) as e:
        train.parse_config(TINY + list(flags))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_start_up_failures_are_one_line_before_any_model_loads(tmp_path, capsys):
    """Corrupt weights, a missing critic model, a tokenizer without a chat template, mistyped env kwargs: one line
    from the command line's check (exit 2), seconds after the start instead of a traceback after the models load."""
    corrupt = model_copy(tmp_path, "corrupt")
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:100])
    assert "model.safetensors is not a readable safetensors file" in bad_start(capsys, "--model", str(corrupt))
    assert "--critic-model '/no/such/critic': no such folder" in bad_start(capsys, "--critic-model", "/no/such/critic")
    plain = model_copy(tmp_path, "plain")
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert "its tokenizer has no chat template" in bad_start(capsys, "--model", str(plain))
    assert "argument 'max_steps' takes a int (its default is 8), not '3'" in bad_start(
        capsys, "--env-kwargs", '{"max_steps": "3"}')
    assert "max_steps must be a whole number >= 1, not 0" in bad_start(capsys, "--env-kwargs", '{"max_steps": 0}')
    assert "argument 'invalid_penalty' takes a float" in bad_start(capsys, "--env-kwargs", '{"invalid_penalty": true}')
    train.parse_config(TINY + ["--env-kwargs", '{"invalid_penalty": 1}'])  # an int where a float is expected: fine


def test_a_meta_json_of_the_wrong_types_is_an_unreadable_checkpoint(tmp_path):
    out, _ = run(tmp_path)
    (tmp_path / "run" / "ckpt-1" / "meta.json").write_text(json.dumps({"iter": "1", "history": {}, "config": []}))
    _, rows = run(tmp_path, "--resume")  # ckpt-1's meta is unreadable: the run resumes from ckpt-0
    assert [r["iter"] for r in rows] == [0, 1, 2]


@pytest.mark.slow  # ~45-65 s on 2 cores (torchrun or a whole run): in CI's slow tier
def test_torchrun_jobs_share_one_lock_and_resume_refuses_a_changed_flag(tmp_path):
    """Two processes of one torchrun are one job (rank 0 holds the lock); a second job on the folder fails in one line
    while the first runs; after it (stopped by SIGTERM, so it checkpoints), --resume with another --group-size is
    refused, naming the flag."""
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           os.path.join(ROOT, "train.py"), *TINY, "--iters", "1000", "--out", out]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(1200):
            if os.path.exists(os.path.join(out, "metrics.jsonl")) or first.poll() is not None:
                break
            time.sleep(0.1)
        second = torchrun_train([*TINY, "--out", out, "--resume"], port=29572, timeout=300)
        assert first.poll() is None, "the first job ended before the second was tried: no overlap tested"
        assert second.returncode != 0 and "error: another job (pid" in second.stderr, second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGTERM)  # torchrun forwards it: each process checkpoints and exits
        _, err = first.communicate(timeout=600)
    assert first.returncode != 0 and "stopped by SIGTERM" in err, err[-3000:]
    assert checkpoint.checkpoints(out) and not os.path.exists(os.path.join(out, run_dir.LOCK))
    again = torchrun_train([*TINY, "--iters", "1000", "--group-size", "4", "--out", out, "--resume"], port=29573,
                           timeout=300)
    assert again.returncode != 0 and "error: --resume with flags that change what is trained: --group-size 2 -> 4" \
        in again.stderr, again.stderr[-2000:]


# ------------------------------------------------------------------------------------------ 3: resume checks its flags
def test_resume_refuses_changed_flags_and_allows_the_documented_ones(tmp_path, monkeypatch):
    out, _ = run(tmp_path)
    with monkeypatch.context() as m:
        no_models(m)
        with pytest.raises(SystemExit, match=r"--envs-per-iter 4 -> 8; --group-size 2 -> 4 \(may change: "):
            run(tmp_path, "--resume", "--iters", "3", "--envs-per-iter", "8", "--group-size", "4")
        with pytest.raises(SystemExit, match=r"--estimator 'step_gae' -> 'grpo'"):
            run(tmp_path, "--resume", "--iters", "3", "--estimator", "grpo")
    _, rows = run(tmp_path, "--resume", "--iters", "3", "--eval-every", "2", "--save-every", "5")  # allowed
    assert [r["iter"] for r in rows] == [0, 1, 2, 3]
    run(tmp_path, "--lr-schedule", "linear", name="sched")
    with pytest.raises(SystemExit, match="--iters 2 -> 4"):  # iteration 1 had another learning rate: not resumable
        run(tmp_path, "--lr-schedule", "linear", "--resume", "--iters", "4", name="sched")
    run(tmp_path, "--lr-schedule", "linear", "--lr-warmup", "5", name="warm-up")  # iterations 0-1 in the warm-up ...
    _, rows = run(tmp_path, "--lr-schedule", "linear", "--lr-warmup", "5", "--resume", "--iters", "8", name="warm-up")
    assert [r["iter"] for r in rows] == list(range(9))  # ... had the same learning rate with --iters 8: continued


def test_lora_adapters_never_resume_on_another_base_with_the_same_path(tmp_path, monkeypatch):
    from model import load_policy
    base = str(tmp_path / "base")
    model, tok = load_policy("tiny")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    run(tmp_path, "--model", base, "--lora-rank", "2", "--iters", "1")
    with torch.no_grad():  # the same shapes, other weights, same folder (a base model replaced by its Instruct)
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(base)
    no_models(monkeypatch)
    with pytest.raises(SystemExit, match="LoRA adapters were trained on another base model"):
        run(tmp_path, "--model", base, "--lora-rank", "2", "--iters", "2", "--resume")


def test_a_checkpoint_of_another_shape_says_size_mismatch_not_corrupt(tmp_path):
    out = str(tmp_path)
    small, big = torch.nn.Linear(3, 1), torch.nn.Linear(4, 1)
    assert checkpoint.save_checkpoint(out, 0, {"policy": (small, None)}, {"iter": 0, "history": [], "config": {}})
    with pytest.raises(SystemExit, match=r"ckpt-0 does not fit the model: Size mismatch .* for policy.model.weight"):
        checkpoint.load_checkpoint(out, {"policy": (big, None)})


# ------------------------------------------------------------------------------------------ 2: a full disk
def full_disk(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_writes_failing_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint.dcp, "save", full_disk)
    with pytest.raises(SystemExit, match=r"checkpoint writes failed in 2 iterations in a row \(--max-failures-in-a-row 2\)"
                                         r"; newest checkpoint: none"):
        run(tmp_path, "--iters", "5", "--save-every", "1", "--max-failures-in-a-row", "2")
    assert [r["iter"] for r in metric_rows(str(tmp_path / "run"))] == [0, 1]
    assert capsys.readouterr().err.count("No space left on device") == 2


def test_a_failed_final_write_keeps_the_newest_checkpoint_and_exits_nonzero(tmp_path, monkeypatch):
    def half_written(model, tok, path, base=""):
        os.makedirs(path, exist_ok=True)
        model.config.save_pretrained(path)  # the config got out, the weights did not
        full_disk()
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_pretrained", half_written)
        with pytest.raises(SystemExit, match=r"final model was not written .*No space left.*newest checkpoint is kept "
                                             r"\(.*ckpt-1\).*--resume") as e:
            run(tmp_path)
    assert e.value.code != 0
    out = tmp_path / "run"
    assert not (out / "final").exists() and not (out / "final.tmp").exists() and (out / "ckpt-1").is_dir()
    run(tmp_path, "--resume")  # room again: the final model is written from the checkpoint
    assert (out / "final" / "config.json").exists() and any((out / "final").glob("*.safetensors"))


def test_too_little_free_space_for_a_checkpoint_is_one_line_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    monkeypatch.setattr(train, "start_fresh", lambda *a: pytest.fail("training started"))
    with pytest.raises(SystemExit, match=r"has 1 MiB free; a checkpoint and final/ need \d+ MiB"):
        run(tmp_path)



def test_save_every_zero_writes_final_only_and_asks_room_for_final_only(tmp_path, monkeypatch, capsys):
    out, rows = run(tmp_path, "--save-every", "0")  # a small disk: no checkpoints, the final model still written
    assert len(rows) == 3 and not checkpoint.checkpoints(out) and os.path.exists(os.path.join(out, "final", "config.json"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    need = {}
    for flags, says in ((["--save-every", "0"], "final/ needs"), ([], "a checkpoint and final/ need")):
        with pytest.raises(SystemExit, match=rf"has 1 MiB free; {says} \d+ MiB") as e:
            run(tmp_path, *flags, name=f"full{len(flags)}")
        need[len(flags)] = int(re.search(r"needs? (\d+) MiB", str(e.value)).group(1))
    # the tiny policy (final/) alone, against policy + critic + two Adam moments each + final/ (about 7x)
    assert 5 * need[2] <= need[0], need


def test_sigterm_with_save_every_zero_stops_without_a_checkpoint_and_says_so(tmp_path):
    out = str(tmp_path / "run")
    code, stderr = sigterm_after_two_rows([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--iters", "50",
                                           "--save-every", "0", "--out", out], out)
    assert code == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    assert "no checkpoint (--save-every 0): the run cannot be resumed" in stderr
    assert not checkpoint.checkpoints(out) and not os.path.exists(os.path.join(out, "final"))

# ------------------------------------------------------------------------------------------ 4, 5, 8: what envs return
BAD_ENV = '''
import sys


class Bad:
    """Says red; on some task seeds it returns a NaN reward, None as info, or calls sys.exit() (a broken simulator)."""
    system_prompt = "Reply with <action>red</action>."
    max_steps = 2

    def __init__(self, split="train"):
        pass

    def _info(self):
        return {"task_id": f"bad-{self.seed}", "won": False, "invalid": False, "expert": "<action>red</action>"}

    def reset(self, seed):
        self.seed = seed
        return "Say red.", self._info()

    def step(self, response):
        kind = self.seed % 7
        if kind == 1:
            return "Right.", float("nan"), True, self._info()
        if kind == 2:
            return "Right.", 1.0, True, None
        if kind == 3:
            sys.exit()
        return "Right.", 1.0, True, {**self._info(), "won": True}
'''


def test_nan_rewards_bad_info_and_sys_exit_in_an_env_end_episodes_not_the_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_env.py").write_text(textwrap.dedent(BAD_ENV))
    monkeypatch.syspath_prepend(str(tmp_path))
    out, rows = run(tmp_path, "--env", "bad_env:Bad", "--iters", "3", "--envs-per-iter", "8", "--sft-episodes", "14",
                    "--eval-episodes", "7")
    assert [r["iter"] for r in rows] == [0, 1, 2, 3]
    assert all(r["eval_env_errors"] == 3 for r in rows if "eval_success_rate" in r)  # seeds 1, 2, 3 of 0..6
    trained = [r for r in rows if "policy_loss" in r]
    assert sum(r["env_errors"] for r in trained) > 0 and all(r["skipped_updates"] == 0 for r in trained)
    err = capsys.readouterr().err
    assert "the first: Bad.step on task seed 1: reward nan (float) is not a finite number" in err  # one per batch
    for line in open(os.path.join(out, "metrics.jsonl")):  # strict JSON: no bare NaN
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_metrics_rows_are_valid_json_with_null_for_non_finite_numbers():
    from records import json_row
    line = json_row({"iter": 3, "a": float("nan"), "b": float("-inf"), "c": 0.5, "d": "x"})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {"iter": 3, "a": None, "b": None, "c": 0.5, "d": "x"}


def test_iterations_that_skip_every_update_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    def skipped(opt, model, max_norm):
        opt.zero_grad(set_to_none=True)
        return float("nan")
    monkeypatch.setattr(scale, "optimizer_step", skipped)
    with pytest.raises(SystemExit, match=r"every update skipped in 2 iterations in a row"):
        run(tmp_path, "--iters", "5", "--max-failures-in-a-row", "2")
    rows = metric_rows(str(tmp_path / "run"))
    assert [r["iter"] for r in rows] == [0, 1] and all(r["skipped_updates"] == 4 for r in rows)  # 2 minibatches x 2
    assert all(r["grad_norm"] is None and r["critic_grad_norm"] is None for r in rows)  # no step taken: null
    assert "iteration 0: skipped 4 of 4 updates" in capsys.readouterr().err


def test_grad_norms_are_the_mean_over_the_steps_taken(tmp_path, monkeypatch):
    """grad_norm / critic_grad_norm are the mean of optimizer_step's norms over the iteration's steps, a skipped
    (non-finite) one left out. Two minibatches, policy then critic in each: policy 2, nan -> 2; critic 4, 6 -> 5."""
    norms = itertools.cycle([2.0, 4.0, float("nan"), 6.0])

    def step(opt, model, max_norm):
        opt.zero_grad(set_to_none=True)
        return next(norms)
    monkeypatch.setattr(scale, "optimizer_step", step)
    _, rows = run(tmp_path, "--sft-steps", "0")
    trained = [r for r in rows if "policy_loss" in r]
    assert len(trained) == 2 and all(r["skipped_updates"] == 1 for r in trained)
    assert all(r["grad_norm"] == 2.0 and r["critic_grad_norm"] == 5.0 for r in trained)


# ------------------------------------------------------------------------------------------ 6: signals at any point
def sigterm_after_start(cmd, out, env, settle, timeout):
    """Start train.py `cmd`, wait for <out>/run.json (written before the warm start) and `settle` seconds more, send
    SIGTERM -> (returncode, stderr, seconds from the signal to the exit)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    for _ in range(1200):
        if os.path.exists(os.path.join(out, "run.json")) or p.poll() is not None:
            break
        time.sleep(0.1)
    time.sleep(settle)
    t = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err, time.time() - t


def test_sigterm_during_the_warm_start_stops_within_seconds(tmp_path):
    """The warm start (here 100,000 steps, hours) is no iteration to finish: SIGTERM stops the process at once with
    128 + 15 and its lock released; before, the signal waited for the warm start to end."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--sft-steps", "100000", "--out", out]
    code, err, seconds = sigterm_after_start(cmd, out, {}, settle=2, timeout=60)  # in the warm start
    assert code == 143 and seconds < 10, (code, err[-2000:])
    assert "SIGTERM received during start-up: stopping now" in err and "Traceback" not in err, err[-2000:]
    assert not os.path.exists(os.path.join(out, run_dir.LOCK)) and not checkpoint.checkpoints(out)
    _, rows = run(tmp_path)  # the same command again: a start that never trained is no other run
    assert [r["iter"] for r in rows] == [0, 1, 2]
    assert len(json.load(open(os.path.join(out, "run.json")))["starts"]) == 1  # a fresh start: run.json anew


HANGING_ENV = '''
import ctypes
import os
import time


class Hangs:
    """Says red; step hangs on some task seeds: in Python (sleep), in C holding the GIL (libc pause through
    ctypes.PyDLL), or its process dies (os._exit)."""
    system_prompt = "Reply with <action>red</action>."
    max_steps = 2

    def __init__(self, split="train", how="python"):
        self.how = how

    def reset(self, seed):
        self.seed = seed
        return "Say red.", {"task_id": f"hangs-{seed}", "won": False, "invalid": False, "expert": "<action>red</action>"}

    def step(self, response):
        if self.seed % 2:
            if self.how == "python":
                time.sleep(1000)
            elif self.how == "c":
                ctypes.PyDLL(None).pause()  # blocks in C without releasing the GIL
            else:
                os._exit(3)
        return "Right.", 1.0, True, {"task_id": f"hangs-{self.seed}", "won": True, "invalid": False, "expert": None}
'''


@pytest.mark.parametrize("how,says", [("python", "did not return in 2 s (--env-timeout)"),
                                      ("c", "did not return in 2 s (--env-timeout)"),
                                      ("exit", "the env's process ended without answering (exit code 3)")])
def test_a_hung_or_dead_env_ends_its_episode_and_is_replaced(tiny, tmp_path, monkeypatch, how, says):
    """Envs in processes (--env-timeout): a step that hangs in Python or in C, or a process that dies, ends that
    episode as an env error within the time-out; the env is replaced and plays the next task; the others are untouched."""
    from envs.process import EnvProcess, close_all
    from rollout import HFEngine, collect
    (tmp_path / "hangs_env.py").write_text(textwrap.dedent(HANGING_ENV))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, tok = tiny
    pool = [EnvProcess("hangs_env:Hangs", {"how": how}, timeout=2) for _ in range(2)]
    try:
        t = time.time()
        trajs = collect(HFEngine(model, tok), pool, tok, [1, 2, 3, 4], max_steps=2, max_new_tokens=5, temperature=1.0,
                        seed=0)
        assert time.time() - t < 20  # two batches, one time-out each (in parallel within a batch)
        assert [t.end for t in trajs] == ["env_error", "terminated"] * 2
        assert says in trajs[0].error and "Hangs.step on task seed 1" in trajs[0].error
        assert all(t.success and len(t.steps) == 1 for t in trajs[1::2])  # replaced envs play the next tasks
    finally:
        close_all()
    assert all(not p.proc.is_alive() for p in pool)


def test_sigterm_while_an_env_hangs_stops_within_seconds(tmp_path):
    """The default time-out (600 s) is for slow simulators; a signal does not wait for it: the run stops
    `Preemption.GRACE` (10 s) after SIGTERM with 143, the newest checkpoint kept."""
    (tmp_path / "hangs_env.py").write_text(textwrap.dedent(HANGING_ENV))
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--env", "hangs_env:Hangs", "--sft-steps", "0",
           "--out", out]
    code, err, seconds = sigterm_after_start(cmd, out, {"PYTHONPATH": str(tmp_path)}, settle=3,  # the first evaluation
                                             timeout=120)  # plays seed 1, which hangs
    assert code == 143 and seconds < 20, (code, err[-2000:])
    assert "stopped by SIGTERM: step of hangs_env:Hangs had not answered 10 s after it" in err, err[-2000:]


def test_env_processes_end_when_their_parent_is_killed(tmp_path):
    """kill -9 of the trainer leaves no env process behind: each sees its pipe close and exits (every child closes
    the sockets it inherited, its siblings' pipes included, so nothing else holds the pipe open)."""
    script = ("import os, sys; sys.path.insert(0, %r)\n"
              "from envs.process import make_envs\n"
              "pool = make_envs('multihop', {'split': 'train'}, 3, 600)\n"
              "print(' '.join(str(e.proc.pid) for e in pool), flush=True)\n"
              "os.kill(os.getpid(), 9)\n" % ROOT)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in r.stdout.split()]
    assert r.returncode == -9 and len(pids) == 3, r.stderr[-2000:]
    for _ in range(100):
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"env processes outlived their parent: {alive}"


# ------------------------------------------------------------------------------------------ 9: sizes
def test_the_host_memory_estimate_against_a_hand_computation():
    from sizes import episode_bytes
    # contexts 100, 130, 160 (+ 20 new + 10 observation tokens a turn): 36 B per kept id, 32 per action id and log-prob
    assert episode_bytes(100, 10, 20, 3, 1000, full=True) == 36 * (100 + 130 + 160) + 32 * 3 * 20
    assert episode_bytes(100, 10, 20, 3, 125, full=True) == 36 * (100 + 125 + 125) + 32 * 3 * 20  # the context's cap
    assert episode_bytes(100, 10, 20, 3, 1000, full=False) == 36 * 3 * 120 + 32 * 3 * 20  # window: no growth


def test_peak_rss_rises_with_what_a_process_touches_and_stays():
    """records.memory_stats (metrics.jsonl's peak_rss_mib): a fresh process that fills 400 MiB more than its peak so
    far reads >= 350 MiB more than before, and still does after freeing it (a peak); no gpu_peak_mib on the CPU."""
    code = textwrap.dedent("""
        import json, torch, records
        cpu = torch.device("cpu")
        before = records.memory_stats(cpu)  # the imports' peak: ~0.5-1.5 GiB
        x = torch.ones(int(before["peak_rss_mib"] + 400) * 2**18)  # fp32: (peak + 400) MiB, written
        during = records.memory_stats(cpu)
        del x
        print(json.dumps([before, during, records.memory_stats(cpu)]))""")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    before, during, after = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(before) == {"peak_rss_mib"}
    assert during["peak_rss_mib"] - before["peak_rss_mib"] >= 350 and after == during


@pytest.mark.parametrize("flag,value", [("--envs-per-iter", "100000"), ("--eval-episodes", "100000000")])
def test_sizes_that_cannot_fit_are_refused_before_the_envs_are_built(tmp_path, monkeypatch, flag, value):
    import envs.process
    monkeypatch.setattr(envs.process, "make_envs", lambda *a: pytest.fail("envs were built"))
    with pytest.raises(SystemExit, match=rf"this run would hold ~[\d.]+ GiB in host memory \(.*{flag} .*GiB is "
                                         r"available: lower those sizes"):
        run(tmp_path, flag, value, "--group-size", "2")


def test_an_env_process_killed_between_calls_is_replaced_on_the_next_one():
    """The OOM killer takes an env's process while the trainer is busy elsewhere: the next call ends that episode
    (EnvDied) instead of a broken pipe in the trainer, and the call after it has a fresh env."""
    from envs.process import EnvDied, EnvProcess
    env = EnvProcess("multihop", {"split": "train"}, timeout=30)
    try:
        first = env.reset(3)
        env.proc.kill()
        env.proc.join(5)
        with pytest.raises(EnvDied, match="reset: the env's process ended without answering"):
            env.reset(3)
        assert env.reset(3) == first and env.proc.is_alive()
    finally:
        env.close()
