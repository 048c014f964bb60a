"""Learning comparison: StepPO vs PPO vs GRPO vs RLOO vs GiGPO with the same model, warm start and budget.

    python bench/bench_learning.py                          # multihop + alfworld, 5 methods + 1 ablation x 3 seeds
    python bench/bench_learning.py --envs multihop --methods StepPO PPO --seeds 0 --jobs 1
    python bench/bench_learning.py --report                 # table and plots from the runs already finished

Every run is one `python train.py ...` process (its exact command is in results/learning.json), 1 thread
each, `--jobs` at a time. Finished runs (a complete metrics.jsonl) are kept under runs/bench_learning/ and
skipped, so an interrupted benchmark picks up where it stopped. All methods of one seed share the warm start
(same seed, same demonstrations, same supervised steps: their iteration-0 evaluations are equal) and the same
number of episodes per iteration; environment steps differ with episode lengths and are reported.
Our results and run times (2 busy cores, up to 5 runs sharing them) are in the README, section "Learning comparison".
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # name -> (estimator, loss)
    "StepPO": ("step_gae", "step"),
    "PPO": ("token_gae", "token"),
    "GRPO": ("grpo", "token"),
    "RLOO": ("rloo", "token"),
    "GiGPO": ("gigpo", "step"),
    "StepGAE-tokenloss": ("step_gae", "token"),  # ablation: StepPO's credit with PPO's per-token ratio and clip
}
ALF = ["--max-steps", "10", "--max-new-tokens", "24", "--eval-episodes", "32",
       "--env-kwargs", '{"n_receptacles": 3, "invalid_penalty": 0.05}']
ENV_ARGS = {  # multihop: train.py's defaults exactly (so StepPO seed 0 is the default run)
    "multihop": [],
    "alfworld": ["--iters", "8", "--envs-per-iter", "16", "--epochs", "1", "--eval-every", "2", *ALF],
}
# env -> flags of one warm-start-only run (train.py --iters 0) that every method and seed of that env starts
# from (--model <warm>/final --sft-steps 0): the tiny model needs ~300 supervised steps on ALFWorld, too many to
# repeat per run on 2 cores. Multihop runs warm-start themselves (150 steps, same seed -> same warm start).
WARM = {"alfworld": ["--iters", "0", "--sft-steps", "300", "--sft-episodes", "128", "--seed", "0", *ALF]}


def command(env, method, seed, out, runs_dir):
    if method == "warm":
        return [sys.executable, "train.py", "--env", env, "--out", out, *WARM[env]]
    est, loss = METHODS[method]
    warm = ["--model", os.path.join(runs_dir, env, "warm", "final"), "--sft-steps", "0"] if env in WARM else []
    return [sys.executable, "train.py", "--env", env, "--estimator", est, "--loss", loss, "--seed", str(seed),
            "--out", out, *warm, *ENV_ARGS[env]]


def metrics(out):
    path = os.path.join(ROOT, out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def finished(out, iters):
    """The run in `out` got to its final evaluation row."""
    rows = metrics(out)
    return bool(rows) and rows[-1]["iter"] == iters and "eval_success_rate" in rows[-1]


def flag(cmd, name, default):
    return type(default)(cmd[cmd.index(name) + 1]) if name in cmd else default


def run_all(jobs):
    """Run what is not finished yet, ARGS.jobs processes at a time; each run's folder gets bench_stats.json
    with its wall time and peak resident memory."""
    todo = [r for r in jobs if not finished(r["out"], r["iters"])]
    running = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    while todo or running:
        while todo and len(running) < ARGS.jobs:
            r = todo.pop(0)
            os.makedirs(os.path.join(ROOT, r["out"]), exist_ok=True)
            log = open(os.path.join(ROOT, r["out"], "train.log"), "w")
            p = subprocess.Popen(r["cmd"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[p.pid] = (r, time.time(), log)
            print(f"start {' '.join(r['cmd'][1:])}", flush=True)
        pid, status, usage = os.wait4(-1, 0)  # per-child peak RSS (ru_maxrss, KiB on Linux)
        r, t0, log = running.pop(pid)
        log.close()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"failed (exit {os.waitstatus_to_exitcode(status)}): {' '.join(r['cmd'])}; see {r['out']}/train.log")
        stats = {"wall_s": time.time() - t0, "peak_rss_mib": usage.ru_maxrss / 1024}
        with open(os.path.join(ROOT, r["out"], "bench_stats.json"), "w") as f:
            json.dump(stats, f)
        print(f"done in {stats['wall_s']:.0f} s: {r['out']}", flush=True)


def summarize(r):
    """Eval curve, final eval, normalised area under the eval curve, env steps, wall time, peak RSS of one run."""
    rows = metrics(r["out"])
    ev = [(row["iter"], row["eval_success_rate"]) for row in rows if "eval_success_rate" in row]
    it, sr = np.array(ev, dtype=float).T
    envs_per_iter = flag(r["cmd"], "--envs-per-iter", 32)
    bench = json.load(open(os.path.join(ROOT, r["out"], "bench_stats.json")))
    return {"iters": it.tolist(), "eval": sr.tolist(), "start": sr[0], "final": sr[-1],
            "auc": float(np.trapezoid(sr, it) / max(it[-1] - it[0], 1)),  # mean eval success over training
            "env_steps": sum(row["mean_steps"] * envs_per_iter for row in rows if "mean_steps" in row),
            "invalid_rate_last": next((row["invalid_rate"] for row in rows[::-1] if "invalid_rate" in row), None),
            "wall_s": bench["wall_s"], "peak_rss_mib": bench["peak_rss_mib"]}


def spread(xs):
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0,
            "min": float(np.min(xs)), "max": float(np.max(xs))}


def report(warm, jobs, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per run, "
                          f"{ARGS.jobs} runs at a time", "runs": [], "summary": {}, "warm_starts": {}}
    for r in warm:
        if finished(r["out"], 0):
            results["warm_starts"][r["env"]] = dict(summarize(r), cmd=" ".join(["python"] + r["cmd"][1:]))
    for env in ARGS.envs:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for method in ARGS.methods:
            done = [r for r in jobs if r["env"] == env and r["method"] == method and finished(r["out"], r["iters"])]
            if not done:
                continue
            runs = [dict(r, **summarize(r), cmd=" ".join(["python"] + r["cmd"][1:])) for r in done]
            results["runs"] += runs
            results["summary"][f"{env}/{method}"] = {k: spread([x[k] for x in runs]) for k in
                                                     ("start", "final", "auc", "env_steps", "wall_s", "peak_rss_mib")}
            results["summary"][f"{env}/{method}"]["seeds"] = [r["seed"] for r in runs]
            curves = np.array([x["eval"] for x in runs])
            mean = curves.mean(0)
            line, = ax.plot(runs[0]["iters"], mean, "o-", ms=3, label=f"{method} (n={len(runs)})")
            ax.fill_between(runs[0]["iters"], curves.min(0), curves.max(0), alpha=0.12, color=line.get_color())
        ax.set_title(f"{env}: held-out greedy success, mean and min-max over seeds", fontsize=10)
        ax.set(xlabel="iteration", ylabel="eval success rate", ylim=(0, max(0.25, ax.get_ylim()[1])))
        ax.legend(fontsize=7, ncol=3, loc="upper left")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"learning_{env}.png"), dpi=120)
        plt.close(fig)
    with open(os.path.join(out_dir, "learning.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| env | method | seeds | eval at start | final eval | AUC (mean eval) | env steps | wall s/run | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for env, w in results["warm_starts"].items():
        lines.append(f"| {env} | warm start only (shared by all runs) | 1 | | {w['final']:.2f} | | | {w['wall_s']:.0f} "
                     f"| {w['peak_rss_mib']:.0f} |")
    for key, s in results["summary"].items():
        env, method = key.split("/")
        pm = lambda k, d=2: f"{s[k]['mean']:.{d}f} ± {s[k]['std']:.{d}f}"  # noqa: E731
        lines.append(f"| {env} | {method} | {len(s['seeds'])} | {pm('start')} | {pm('final')} "
                     f"[{s['final']['min']:.2f}, {s['final']['max']:.2f}] | {pm('auc')} | {s['env_steps']['mean']:.0f} "
                     f"| {s['wall_s']['mean']:.0f} | {s['peak_rss_mib']['max']:.0f} |")
    with open(os.path.join(out_dir, "learning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=list(ENV_ARGS), choices=list(ENV_ARGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--runs-dir", default="runs/bench_learning", help="relative to the repository root")
    p.add_argument("--report", action="store_true", help="only summarise the runs already finished")
    ARGS = p.parse_args()

    def job(env, method, seed):
        out = os.path.join(ARGS.runs_dir, env, method, *([] if method == "warm" else [f"seed{seed}"]))
        cmd = command(env, method, seed, out, ARGS.runs_dir)
        return {"env": env, "method": method, "seed": seed, "iters": flag(cmd, "--iters", 30), "out": out, "cmd": cmd}

    warm = [job(e, "warm", 0) for e in ARGS.envs if e in WARM]
    jobs = [job(e, m, s) for e in ARGS.envs for s in ARGS.seeds for m in ARGS.methods]
    if not ARGS.report:
        run_all(warm)  # first: the runs of that env start from it
        run_all(jobs)
    report(warm, jobs, os.path.join(ROOT, "bench", "results"))
