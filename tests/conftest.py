"""Shared test helpers: offline Hugging Face, a tiny deterministic env (the envs/ protocol), the tiny policy."""
import copy
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CountEnv:
    """A deterministic counting game with the envs/ protocol. Seed s lasts 1 + s % 4 turns whatever the agent
    says (so episode lengths are known), its texts grow with s (mixed prompt lengths), reward 1 at the end."""
    system_prompt = "You are playing a counting game. Reply with <action>next</action>."
    max_steps = 4

    def __init__(self, with_prompt: bool = False):
        self.with_prompt = with_prompt  # also give info["prompt"] (the window-context message)

    def _info(self, obs):
        info = {"task_id": f"count-{self.seed}", "won": self.t >= self.n, "invalid": False, "admissible": None,
                "expert": "<action>next</action>"}
        if self.with_prompt:
            info["prompt"] = f"Task: count to {self.n}. Now: {obs}"
        return info

    def reset(self, seed: int):
        self.seed, self.n, self.t = seed, 1 + seed % 4, 0
        obs = f"Count to {self.n}." + " Keep going." * (seed % 5)
        return obs, self._info(obs)

    def step(self, response: str):
        self.t += 1
        obs = f"You said {response[:20]!r}. Count is {self.t}."
        done = self.t >= self.n
        return obs, float(done), done, self._info(obs)


def forward_logprobs(model, prompt_ids: list[int], action_ids: list[int]) -> torch.Tensor:
    """Trainer-side log-probs of action_ids given prompt_ids: one forward pass, logits at j - 1 for token j."""
    ids = torch.tensor([prompt_ids + action_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # (L, V)
    lp = torch.log_softmax(logits[len(prompt_ids) - 1: -1], -1)  # (A, V)
    return lp.gather(1, torch.tensor(action_ids)[:, None]).squeeze(1)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and 2 OpenMP threads on a busy 2-core box can be 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny():
    from model import load_policy
    return load_policy("tiny")


def check_sync(engine, model, tok):
    """Perturb a copy of `model`, check the engine does not follow it yet, sync, check it follows (1e-4), sync back."""
    from rollout import first_prompt
    trainer = copy.deepcopy(model)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt = first_prompt(tok, CountEnv.system_prompt, "Count to 3.")
    (ids, lps), = engine.generate([prompt], 8, 1.0, seed=0)
    assert not torch.allclose(forward_logprobs(trainer, prompt, ids), torch.tensor(lps), atol=1e-3)
    for m in (trainer, model):  # and back, so the shared engine leaves the check as it came in
        engine.sync(m)
        (ids, lps), = engine.generate([prompt], 8, 1.0, seed=0)  # same prompt: no stale weights or cached KV
        assert torch.allclose(forward_logprobs(m, prompt, ids), torch.tensor(lps), atol=1e-4)


def torchrun_train(flags: list[str], port: int, env: dict | None = None, timeout: int = 600):
    """`torchrun --nproc_per_node 2 train.py *flags` on CPU (gloo), one OpenMP thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "train.py"), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


TINY = ["--iters", "2", "--envs-per-iter", "4", "--group-size", "2", "--max-steps", "3", "--max-new-tokens", "10",
        "--sft-steps", "3", "--sft-episodes", "4", "--eval-episodes", "2", "--eval-every", "1", "--minibatch-size", "2"]


def run(tmp_path, *flags, name="run"):
    """train.main with the tiny budgets TINY and `flags` into tmp_path/name -> (out, metrics.jsonl rows)."""
    import train
    out = str(tmp_path / name)
    train.main(train.parse_config(TINY + ["--out", out, *flags]))
    return out, metric_rows(out)


def metric_rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# the keys that measure the machine (time, memory), not what the run computed: they differ between equal runs
MEASURED = {"wall_s", "tokens_per_s", "train_tokens_per_s", "rollout_s", "forward_s", "credit_s", "update_s",
            "peak_rss_mib", "gpu_peak_mib"}


def computed(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without the MEASURED keys: what two equal runs must agree on."""
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


def assert_same_metrics(a: list[dict], b: list[dict], exact: bool = False):
    """Two runs' metrics.jsonl rows: as many, the same iterations, every key but MEASURED equal: bit for bit (exact: the
    same process set-up and thread count), else to float noise (rel 1e-6, abs 1e-9: another process layout)."""
    assert [r["iter"] for r in a] == [r["iter"] for r in b], ([r["iter"] for r in a], [r["iter"] for r in b])
    assert computed(a) == (computed(b) if exact else [pytest.approx(r, rel=1e-6, abs=1e-9) for r in computed(b)])


def sigterm_after_two_rows(cmd: list[str], out: str, timeout: int = 180) -> tuple[int, str]:
    """Start `cmd` (a train.py run writing to `out`), send SIGTERM once metrics.jsonl has two rows; (returncode, stderr)."""
    import signal
    import time
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    start = time.time()
    while time.time() - start < timeout and not (os.path.exists(os.path.join(out, "metrics.jsonl"))
                                                 and len(metric_rows(out)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr



def one_iteration(cfg, policy, critic, ref, trajs, pad_id, device=torch.device("cpu"), g=None):
    """train.run's steps 3-4 on `trajs`: the minibatches (drawn with `g`), the no-grad pass, credit ->
    (batches, fwd, adv); fwd also holds the no-grad outputs as (N, T[, A]) grids (old_lp, ref_lp, v_step, v_tok) for
    comparisons with a step-by-step loop. Then learner.update(cfg, policy, critic, opt_p, opt_c, batches, device)."""
    import learner
    batches = learner.minibatches(cfg, trajs, pad_id, device, g if g is not None else torch.Generator())
    fwd = learner.no_grad_pass(cfg, policy, critic, ref, batches, trajs, pad_id, device)
    N, T = len(trajs), max(len(t.steps) for t in trajs)
    A = max(1, max(len(s.action_ids) for t in trajs for s in t.steps))
    for key in ("old_lp", "ref_lp", "v_step", "v_tok"):
        if key in batches[0][0].out:
            fwd[key] = learner.as_grid(batches, key, (N, T) if key == "v_step" else (N, T, A))
    return batches, fwd, learner.compute_advantages(cfg, trajs, batches, fwd["boot"], device)
