"""Learning comparison (v3): StepPO against PPO, GRPO, RLOO, GiGPO, REINFORCE++-baseline and two ablations.

    python bench/bench_learning.py                      # everything: lr sweeps, then 5 reported seeds, both envs
    python bench/bench_learning.py --envs multihop --jobs 2
    python bench/bench_learning.py --report             # tables and plots from the runs already finished

Protocol (nothing reported was used to choose anything):
1. Sweep. Every method runs at each learning rate of LRS on the tuning seeds (never reported), evaluated on the
   multihop validation split (questions disjoint from both train and eval, `--eval-split valid`). A method's lr is
   the one with the highest mean AUC of validation success over the tuning seeds (ties: the smaller lr). The
   same lr is used for both envs (an ALFWorld sweep would cost more than the whole report on 2 cores).
2. Report. Every method at its chosen lr on REPORT_SEEDS, held-out (eval split) greedy success. All methods of a
   seed start from the same saved warm start (multihop: one `--iters 0` run per seed, tuning seeds included;
   ALFWorld: one for every seed), so StepPO and a baseline are compared seed by seed (paired).
Every run is one `python train.py ...` process (its exact command, CPU and library versions are in
results/learning.json), 1 thread, `--jobs` at a time; finished runs (a complete metrics.jsonl) under
runs/bench_learning/ are skipped and an interrupted one continues from its newest checkpoint (train.py --resume,
exact; a run folder whose `model_sha256` names another warm start than the one here now is discarded and rerun), so
the benchmark can be stopped and restarted at any time (a resumed run's wall time covers only its last part:
bench_stats.json says "resumed"). Each finished run's summary is recorded in results/learning.json as soon as it
ends, and the ALFWorld warm start's model is kept in results/warm_alfworld_seed0/, so a fresh checkout (run folders
gone) skips and reports what an earlier machine finished: a recorded run counts only if its command is the same as
now (and its warm start's weights, where both are known: `model_sha256`). The tables (summary, paired, learning.md
and the plots) are rewritten from all recorded runs at the end, or by --report. Methods run at the authors' settings
for each (train.py's defaults: k3 KL loss 0.001, 1 epoch, gamma = lambda = 1; the step loss clips at 3e-4 / 4e-4,
the token loss at 0.2 / 0.28 + dual clip).
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # name -> train.py flags; critic-free baselines use the token loss, as in the authors' scripts
    "StepPO": ["--estimator", "step_gae", "--loss", "step"],
    "PPO": ["--estimator", "token_gae", "--loss", "token"],
    "GRPO": ["--estimator", "grpo", "--loss", "token"],
    "RLOO": ["--estimator", "rloo", "--loss", "token"],
    "GiGPO": ["--estimator", "gigpo", "--loss", "token"],
    "REINFORCE++-baseline": ["--estimator", "reinforce_pp_baseline", "--loss", "token"],
    "StepGAE+token-ratio": ["--estimator", "step_gae", "--loss", "token"],  # StepPO's credit, PPO's ratio and clip
    "TokenGAE+step-ratio": ["--estimator", "token_gae", "--loss", "step"],  # PPO's credit, StepPO's ratio and clip
}
LRS = [3e-5, 1e-4, 3e-4]  # around the default 1e-4, a factor ~3 each way
TUNE_SEEDS, REPORT_SEEDS = [100, 101], [0, 1, 2, 3, 4]
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from train import Config  # noqa: E402

ITERS = Config.iters  # train.py's default --iters (what a run without --iters does)
TUNE = ["--env", "multihop", "--eval-split", "valid"]  # choose on the validation questions, never on eval
# ALFWorld: small generated scenes (3 receptacles), 10 turns, 600 training games, and ALFWorld's handcoded expert (it
# searches from what it has seen, so imitating it carries over to unseen scenes; the planner knows where everything
# is and cloning it only memorises games) slipping in 70% of episodes, as multihop's expert does; no invalid-action
# penalty (with 0.05 rare wins leave the penalty as the main signal). Chosen on tuning seed 100 and the valid split:
# StepPO 0.03 -> 0.23 in 24 x 16 (bench/results/alfworld_slip_probe.md).
ALF = ["--max-steps", "10", "--max-new-tokens", "24", "--eval-episodes", "64", "--env-kwargs",
       '{"n_receptacles": 3, "expert": "handcoded", "expert_slip": 0.7, "max_steps": 10, "n_games": 600}']
ENV_ARGS = {  # multihop: train.py's defaults (RL from a saved warm start, below)
    "multihop": [],
    "alfworld": ["--env", "alfworld", "--iters", "24", "--envs-per-iter", "16", "--eval-every", "8", *ALF],
}
# Every run starts from a saved warm start (train.py --iters 0, then --model <warm>/final --sft-steps 0) shared by
# all the runs of its env and seed: 1000 supervised steps per run would cost more than the RL on 2 cores. RL starts
# with a fresh optimiser either way, so this equals one full run (test_iters_zero_is_a_warm_start_other_runs_can_share):
# multihop StepPO at lr 1e-4, seed 0, is `python train.py` (on one machine: docs/results.md, "The default run").
# ALFWorld: one warm start (seed 0) for every seed (~45 min at 1 thread): 1000 steps on 600 demonstrations.
WARM = {"tune": [*TUNE, "--iters", "0"], "multihop": ["--iters", "0"],
        "alfworld": ["--env", "alfworld", "--iters", "0", "--sft-steps", "1000", "--sft-episodes", "600", *ALF]}
WARM_SEEDS = {"tune": TUNE_SEEDS, "multihop": REPORT_SEEDS, "alfworld": [0]}


RESULTS = os.path.join(ROOT, "bench", "results", "learning.json")
KEEP_WARM = ["alfworld"]  # warm starts kept in the repository: ~50 min to rebuild, and not bit-equal on another machine


def warm_out(env, seed):
    return os.path.join(ARGS.runs_dir, env, "warm", f"seed{seed}")


def warm_model(env, seed):
    """The warm start RL runs load: the kept copy (KEEP_WARM) or the warm run's final/ folder."""
    kept = os.path.join("bench", "results", f"warm_{env}_seed{seed}")
    return kept if env in KEEP_WARM else os.path.join(warm_out(env, seed), "final")


def command(job):
    env, out = job["env"], job["out"]
    if job["method"] == "warm":
        return [sys.executable, "train.py", "--seed", str(job["seed"]), "--out", out, *WARM[env]]
    base = TUNE if env == "tune" else ENV_ARGS[env]
    warm_seed = job["seed"] if job["seed"] in WARM_SEEDS[env] else WARM_SEEDS[env][0]
    return [sys.executable, "train.py", *METHODS[job["method"]], "--lr", str(job["lr"]), "--seed", str(job["seed"]),
            "--out", out, "--model", warm_model(env, warm_seed), "--sft-steps", "0", *base]


def metrics(out):
    path = os.path.join(ROOT, out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def flag(cmd, name, default):
    return type(default)(cmd[cmd.index(name) + 1]) if name in cmd else default


def finished_here(job):
    """The run folder holds the run's final evaluation row, and was made from the warm start that is here now."""
    rows = metrics(job["out"])
    done = bool(rows) and rows[-1]["iter"] == flag(job["cmd"], "--iters", ITERS) and "eval_success_rate" in rows[-1]
    return done and not stale(job)


def load_results():
    return json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}


def save_results(res):
    """Write results/learning.json atomically (a run finishing mid-write must not leave half a record)."""
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)


def shown_cmd(job):
    """The command as results/learning.json records it (and matches it): `python train.py ...`."""
    return " ".join(["python"] + job["cmd"][1:])


def model_sha256(path):
    """First 16 hex digits of the sha256 of a saved model's weights (None if it is not here)."""
    f = os.path.join(ROOT, path or "", "model.safetensors")
    return hashlib.sha256(open(f, "rb").read()).hexdigest()[:16] if path and os.path.exists(f) else None


def model_of(job):
    """The saved model a run starts from (its --model); for a kept warm start, the model it made."""
    if job["method"] == "warm":
        return warm_model(job["env"], job["seed"]) if job["env"] in KEEP_WARM else None
    return flag(job["cmd"], "--model", "")


def stale(job):
    """An RL run's folder names (model_sha256, written at launch) another warm start than the one here now: the
    warm start was rebuilt under the same folder name, so the folder's runs and checkpoints belong to the old one."""
    path, sha = os.path.join(ROOT, job["out"], "model_sha256"), model_sha256(model_of(job))
    return job["method"] != "warm" and sha is not None and os.path.exists(path) and open(path).read() != sha


def recorded(job):
    """This run's summary in results/learning.json, if one with the same command was recorded (else None). Where
    the record names its model's hash and that model is here, the hashes must agree too: the command names a warm
    start by its folder, and a rebuilt warm start (not bit-equal across machines) must not mix with the old runs."""
    res = load_results()
    entries = res.get("sweep", []) + res.get("runs", []) + list(res.get("warm_starts", {}).values())
    cmd, sha = shown_cmd(job), model_sha256(model_of(job))
    return next((e for e in entries if e.get("cmd") == cmd and (sha is None or e.get("model_sha256", sha) == sha)), None)


def finished(job):
    """Finished here, or on an earlier machine (recorded; a kept warm start also needs its model)."""
    if finished_here(job):
        return True
    kept = os.path.join(ROOT, warm_model(job["env"], job["seed"]))
    needs_model = job["method"] == "warm" and job["env"] in KEEP_WARM
    return recorded(job) is not None and (not needs_model or os.path.exists(kept))


def record(job):
    """Write a just-finished run's summary into results/learning.json (atomically), and keep its warm-start model."""
    if job["method"] == "warm" and job["env"] in KEEP_WARM:
        kept = os.path.join(ROOT, warm_model(job["env"], job["seed"]))
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, job["out"], "final"), kept)
    res, entry = load_results(), dict(job, **summarize(job))
    if job["method"] == "warm":
        res.setdefault("warm_starts", {})[f"{job['env']}/seed{job['seed']}"] = entry
    else:
        key = "sweep" if job["env"] == "tune" else "runs"
        res[key] = [e for e in res.get(key, []) if e.get("out") != job["out"]] + [entry]
    save_results(res)


def run_all(jobs):
    """Run the unfinished jobs, ARGS.jobs processes at a time; each run's folder gets bench_stats.json (wall time
    and peak resident memory of that process, from os.wait4, and the install it ran on)."""
    todo = [j for j in jobs if not finished(j)]
    running = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    while todo or running:
        while todo and len(running) < ARGS.jobs:
            j = todo.pop(0)
            if stale(j):  # neither finished nor resumable: start again (a record of it stays in results, by hash)
                print(f"discard {j['out']}: made from another warm start", flush=True)
                shutil.rmtree(os.path.join(ROOT, j["out"]))
            os.makedirs(os.path.join(ROOT, j["out"]), exist_ok=True)
            sha = None if j["method"] == "warm" else model_sha256(model_of(j))
            if sha:
                with open(os.path.join(ROOT, j["out"], "model_sha256"), "w") as f:
                    f.write(sha)
            resume = bool(checkpoint.checkpoints(os.path.join(ROOT, j["out"])))  # an interrupted run
            log = open(os.path.join(ROOT, j["out"], "train.log"), "a" if resume else "w")
            again = ["--resume"] if resume else ["--overwrite"]  # a start that died before its first checkpoint: again
            p = subprocess.Popen(j["cmd"] + again, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[p.pid] = (j, time.time(), log, resume)
            print(f"{'resume' if resume else 'start'} {' '.join(j['cmd'][1:])}", flush=True)
        pid, status, usage = os.wait4(-1, 0)
        j, t0, log, resume = running.pop(pid)
        log.close()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"failed (exit {os.waitstatus_to_exitcode(status)}): {' '.join(j['cmd'])}; see {j['out']}/train.log")
        with open(os.path.join(ROOT, j["out"], "bench_stats.json"), "w") as f:
            json.dump({"wall_s": time.time() - t0, "peak_rss_mib": usage.ru_maxrss / 1024, "resumed": resume,
                       "install": install()}, f)
        record(j)
        print(f"done in {time.time() - t0:.0f} s: {j['out']}", flush=True)


def install():
    """What can change a run's numbers besides the code: CPU model and the numeric libraries' versions."""
    import tokenizers, torch, transformers
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return (f"{cpu}; python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, tokenizers {tokenizers.__version__}, numpy {np.__version__}")


def summarize(job):
    """Eval curve, start, final, AUC (mean held-out success over the run: trapezoid over iterations), env steps,
    wall time and peak RSS of one finished run (recorded in results/learning.json if its folder is gone)."""
    if not finished_here(job):
        return {k: v for k, v in recorded(job).items() if k not in job or k == "cmd"}  # the record less the job
    rows = metrics(job["out"])
    it, sr = np.array([(r["iter"], r["eval_success_rate"]) for r in rows if "eval_success_rate" in r], dtype=float).T
    stats_path = os.path.join(ROOT, job["out"], "bench_stats.json")
    bench = json.load(open(stats_path)) if os.path.exists(stats_path) else {"wall_s": None, "peak_rss_mib": None}
    per_iter = flag(job["cmd"], "--envs-per-iter", 32)
    upd = [r for r in rows if r["iter"] > 0 and "clipfrac" in r]  # the iterations that updated the policy
    return {"iters": it.tolist(), "eval": sr.tolist(), "start": sr[0], "final": sr[-1],
            "auc": float(np.trapezoid(sr, it) / max(it[-1] - it[0], 1)),
            # how far the policy moved: KL(policy || warm start) per iteration, and the share of clipped ratios
            "kl_ref": [r["kl_ref"] for r in upd], "clipfrac": float(np.mean([r["clipfrac"] for r in upd] or [0])),
            "env_steps": sum(r["mean_steps"] * per_iter for r in rows if "mean_steps" in r), **bench,
            "cmd": shown_cmd(job), "model_sha256": model_sha256(model_of(job))}


T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t quantile, 1..10 dof


def ci95(xs):
    """Mean and the half-width of the 95% confidence interval of the mean (Student t, n - 1 dof)."""
    xs = np.asarray(xs, dtype=float)
    if len(xs) < 2:
        return float(xs.mean()), float("nan")
    t = T975[len(xs) - 2] if len(xs) <= len(T975) + 1 else 1.96
    return float(xs.mean()), float(t * xs.std(ddof=1) / np.sqrt(len(xs)))


def choose_lrs(sweep):
    """Rule 2 of the protocol: per method, the lr with the highest mean tuning AUC (ties: the smaller lr)."""
    chosen, table = {}, {}
    for m in ARGS.methods:
        scores = {}
        for lr in LRS:
            done = [summarize(j)["auc"] for j in sweep if j["method"] == m and j["lr"] == lr and finished(j)]
            if len(done) == len(TUNE_SEEDS):
                scores[lr] = float(np.mean(done))
        table[m] = scores
        if len(scores) == len(LRS):
            chosen[m] = max(LRS, key=lambda lr: (scores[lr], -lr))
    return chosen, table


def jobs_for(env, methods_lr, seeds, method_list):
    out = []
    for seed in seeds:
        for m in method_list:
            if m not in methods_lr:
                continue
            lrs = methods_lr[m] if isinstance(methods_lr[m], list) else [methods_lr[m]]
            for lr in lrs:
                j = {"env": env, "method": m, "seed": seed, "lr": lr,
                     "out": os.path.join(ARGS.runs_dir, env, m, f"lr{lr:g}", f"seed{seed}")}
                out.append(dict(j, cmd=command(j)))
    return out


def report(sweep, chosen, table, runs, warm):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per run, "
                      f"{ARGS.jobs} runs at a time", "lrs": LRS, "tune_seeds": TUNE_SEEDS, "report_seeds": REPORT_SEEDS,
           "sweep": [dict(j, **summarize(j)) for j in sweep if finished(j)], "sweep_auc": table, "chosen_lr": chosen,
           "warm_starts": {f"{w['env']}/seed{w['seed']}": summarize(w) for w in warm if finished(w)}, "runs": [], "summary": {}, "paired": {}}
    lines = ["| env | method | lr | seeds | eval at start | final eval (95% CI) | gain over start, paired (95% CI) "
             "| AUC (95% CI) | env steps | wall s/run (not resumed) |", "|---|---|---|---|---|---|---|---|---|---|"]
    paired = ["| env | StepPO minus | final: mean diff (95% CI) | AUC: mean diff (95% CI) | seeds StepPO better / worse (AUC) |",
              "|---|---|---|---|---|"]
    moved = ["| env | method | seeds | KL to warm start, end (95% CI) | KL, mean over iterations (95% CI) "
             "| StepPO minus, KL mean, paired (95% CI) | ratios clipped |", "|---|---|---|---|---|---|---|"]
    for env in ARGS.envs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        by_method = {}
        for m in ARGS.methods:
            done = sorted((j for j in runs if j["env"] == env and j["method"] == m and finished(j)), key=lambda j: j["seed"])
            if not done:
                continue
            s = [dict(j, **summarize(j)) for j in done]
            by_method[m] = {x["seed"]: x for x in s}
            res["runs"] += s
            f, fh = ci95([x["final"] for x in s])
            a, ah = ci95([x["auc"] for x in s])
            st, _ = ci95([x["start"] for x in s])
            gain, gh = ci95([x["final"] - x["start"] for x in s])  # each seed against its own warm start
            walls = [x["wall_s"] for x in s if x["wall_s"] and not x.get("resumed")]  # a resumed run timed only its end
            sm = res["summary"][f"{env}/{m}"] = {
                "lr": s[0]["lr"], "seeds": [x["seed"] for x in s], "start": st, "final": f, "final_ci95": fh,
                "gain": gain, "gain_ci95": gh, "auc": a, "auc_ci95": ah,
                "env_steps": float(np.mean([x["env_steps"] for x in s])), "wall_s": float(np.mean(walls)) if walls else None}
            lines.append(f"| {env} | {m} | {sm['lr']:g} | {len(s)} | {st:.3f} | {f:.3f} ± {fh:.3f} | {gain:+.3f} ± {gh:.3f} "
                         f"| {a:.3f} ± {ah:.3f} | {sm['env_steps']:.0f} | {sm['wall_s'] or float('nan'):.0f} |")
            curves = np.array([x["eval"] for x in s])
            mean = curves.mean(0)
            half = [ci95(c)[1] for c in curves.T] if len(s) > 1 else np.zeros_like(mean)
            line, = ax.plot(s[0]["iters"], mean, "o-", ms=3, label=f"{m} (lr {s[0]['lr']:g}, n={len(s)})",
                            lw=2.2 if m == "StepPO" else 1.2)
            ax.fill_between(s[0]["iters"], mean - half, mean + half, alpha=0.12, color=line.get_color())
        for m, per_seed in by_method.items():
            if m == "StepPO" or "StepPO" not in by_method:
                continue
            seeds = sorted(set(per_seed) & set(by_method["StepPO"]))
            if len(seeds) < 2:
                continue
            d_final = [by_method["StepPO"][k]["final"] - per_seed[k]["final"] for k in seeds]
            d_auc = [by_method["StepPO"][k]["auc"] - per_seed[k]["auc"] for k in seeds]
            (df, dfh), (da, dah) = ci95(d_final), ci95(d_auc)
            better, worse = sum(d > 0 for d in d_auc), sum(d < 0 for d in d_auc)
            res["paired"][f"{env}/{m}"] = {"seeds": seeds, "final_diff": df, "final_diff_ci95": dfh, "auc_diff": da,
                                           "auc_diff_ci95": dah, "stepppo_better": better, "stepppo_worse": worse}
            paired.append(f"| {env} | {m} | {df:+.3f} ± {dfh:.3f} | {da:+.3f} ± {dah:.3f} | {better} / {worse} |")
        kl_mean = {m: {k: np.mean(x["kl_ref"]) for k, x in per_seed.items() if x.get("kl_ref")}
                   for m, per_seed in by_method.items()}
        for m, per_seed in by_method.items():  # runs recorded with their training diagnostics (not the oldest)
            seeds = sorted(kl_mean[m])
            if len(seeds) < 2:
                continue
            (ke, keh), (km, kmh) = ci95([per_seed[k]["kl_ref"][-1] for k in seeds]), ci95([kl_mean[m][k] for k in seeds])
            both = sorted(set(seeds) & set(kl_mean.get("StepPO", {})))
            vs = ""  # StepPO minus this method, paired, where both have the diagnostics on 2+ seeds
            if m != "StepPO" and len(both) > 1:
                d, dh = ci95([kl_mean["StepPO"][k] - kl_mean[m][k] for k in both])
                vs = f"{d:+.4f} ± {dh:.4f}"
            moved.append(f"| {env} | {m} | {', '.join(map(str, seeds))} | {ke:.4f} ± {keh:.4f} | {km:.4f} ± {kmh:.4f} | "
                         f"{vs} | {np.mean([per_seed[k]['clipfrac'] for k in seeds]):.4f} |")
        ax.set_title(f"{env}: held-out greedy success, mean over seeds with 95% CI", fontsize=10)
        ax.set(xlabel="iteration", ylabel="eval success rate", ylim=(0, max(0.3, ax.get_ylim()[1])))
        ax.legend(fontsize=6.5, ncol=2, loc="upper left")
        fig.tight_layout()
        fig.savefig(os.path.join(ROOT, "bench", "results", f"learning_{env}.png"), dpi=120)
        plt.close(fig)
    sweep_lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | chosen |",
                   "|---|" + "---|" * (len(LRS) + 1)]
    for m, scores in table.items():
        sweep_lines.append(f"| {m} | " + " | ".join(f"{scores[lr]:.3f}" if lr in scores else "" for lr in LRS)
                           + f" | {chosen.get(m, ''):g} |" if m in chosen else f"| {m} | (incomplete) |")
    text = ("## Learning-rate sweep (multihop validation split, seeds " + ", ".join(map(str, TUNE_SEEDS))
            + "; mean AUC of validation success)\n\n" + "\n".join(sweep_lines)
            + "\n\n## Report (eval split, seeds " + ", ".join(map(str, REPORT_SEEDS)) + ")\n\n" + "\n".join(lines)
            + "\n\n## Paired: StepPO minus each method, same seeds and warm starts\n\n" + "\n".join(paired)
            + "\n\n## How far each policy moved (training diagnostics: KL(policy || warm start), k3 estimate on the"
            " iteration's samples; share of clipped ratios, per step for the step loss, per token for the token loss;"
            " recorded from runs finished after these fields were added)\n\n" + "\n".join(moved) + "\n")
    old = load_results()  # the record: runs of envs or methods left out of this report stay in it
    for key in ("sweep", "runs"):
        outs = {e["out"] for e in res[key]}
        res[key] += [e for e in old.get(key, []) if e["out"] not in outs]
    for key in ("warm_starts", "summary", "paired"):
        res[key] = {**old.get(key, {}), **res[key]}
    save_results(res)
    with open(os.path.join(ROOT, "bench", "results", "learning.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=list(ENV_ARGS), choices=list(ENV_ARGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--runs-dir", default="runs/bench_learning", help="relative to the repository root")
    p.add_argument("--report", action="store_true", help="only summarise the runs already finished")
    ARGS = p.parse_args()

    def warm_jobs(env):
        return [dict(j, cmd=command(j)) for j in ({"env": env, "method": "warm", "seed": s, "lr": None,
                                                    "out": warm_out(env, s)} for s in WARM_SEEDS[env])]

    sweep = jobs_for("tune", {m: LRS for m in ARGS.methods}, TUNE_SEEDS, ARGS.methods)
    if not ARGS.report and not all(map(finished, sweep)):  # the tuning warm starts serve only the sweep
        run_all(warm_jobs("tune"))
        run_all(sweep)
    chosen, table = choose_lrs(sweep)
    warm = [j for e in ARGS.envs for j in warm_jobs(e)]
    runs = [j for e in ARGS.envs for j in jobs_for(e, chosen, REPORT_SEEDS, ARGS.methods)]
    if not ARGS.report:
        run_all(warm)
        run_all(runs)
    report(sweep, chosen, table, runs, warm)
