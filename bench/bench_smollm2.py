"""A real pretrained LLM learns with StepPO on a 2-core CPU: SmolLM2-135M-Instruct on multihop.

    python bench/bench_smollm2.py                              # warm start once, StepPO seeds 0-2 -> results/smollm2.json
    python bench/bench_smollm2.py --methods StepPO,PPO,GRPO    # the paper's question at this scale, same recipe
    python bench/bench_smollm2.py --tune --lrs 1e-5,3e-5       # choose the lr: tuning seed 100, validation questions
    python bench/bench_smollm2.py --tune --methods PPO,GRPO --lrs 3e-6,1e-5,3e-5   # the baselines' own lr, the same way
    python bench/bench_smollm2.py --report                     # tables and the curve from the runs recorded
    python bench/bench_smollm2.py --time-warm-start            # the warm start again, alone: its wall time
    python bench/bench_smollm2.py --tag avx512bf16 --seeds 0   # on another machine, into results/smollm2-avx512bf16.json

The recipe (RECIPE below; `train.py` flags only): bf16 on CPU (one process: a bf16 twin over fp32 masters), micro-
batches with the LM head at action tokens, a short warm start on the impatient expert's demonstrations (SmolLM2
knows English and chat turns: 100 steps where the 1M-parameter model needs 1000), then RL iterations of 16 episodes
(4 tasks x 4). One warm start (`--iters 0`, seed 0) is shared by every run: each RL run is `--model <warm>/final
--sft-steps 0 --seed k`, which equals a whole run with that warm start (test_iters_zero_is_a_warm_start_other_runs_can_share).
Protocol (as bench_learning.py): settings are chosen on tuning seed 100 with `--eval-split valid` (questions disjoint
from train and eval), never on the reported seeds; reported runs are evaluated greedily on the eval split. `--tune`
makes its own warm start on the tuning seed (TUNE_WARM: the same steps, evaluated on the validation questions) and
runs RL from it for each of --methods at each learning rate.
Resumable: a finished run folder (complete metrics.jsonl) is skipped, an interrupted one continues with --resume
(exact); each finished run's summary is written to results/smollm2.json as soon as it ends, so a later session on a
fresh checkout reports it without the run folders. Every record names the machine and library versions.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "runs", "bench_smollm2")
RESULTS = os.path.join(ROOT, "bench", "results", "smollm2.json")
PLOT = os.path.join(ROOT, "bench", "results", "smollm2_multihop.png")
RECIPE = ["--dtype", "bf16", "--micro-tokens", "4096", "--envs-per-iter", "16",
          "--group-size", "4", "--eval-every", "10", "--eval-episodes", "64"]
WARM = ["--model", "smollm2-135m", "--iters", "0", "--sft-steps", "100", "--sft-lr", "3e-5", "--sft-episodes", "128", "--seed", "0"]
RL = ["--sft-steps", "0", "--iters", "30", "--lr", "1e-5", "--critic-lr", "1e-4"]
METHODS = {"StepPO": ["--estimator", "step_gae", "--loss", "step"], "PPO": ["--estimator", "token_gae", "--loss", "token"],
           "GRPO": ["--estimator", "grpo", "--loss", "token"]}
SEEDS, TUNE_SEED = [0, 1, 2], 100
# --tune's own warm start: the same steps on the tuning seed, evaluated on the validation questions
TUNE_WARM = [*WARM[:WARM.index("--seed")], "--seed", str(TUNE_SEED), "--eval-split", "valid", "--eval-episodes", "32"]
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t quantile, 1..10 dof


def rows(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run(name, flags, iters):
    """train.py with `flags` into runs/bench_smollm2/<name>: skipped when finished, resumed when interrupted."""
    out = os.path.join(RUNS, name)
    if any(r["iter"] == iters for r in rows(out)) and os.path.isdir(os.path.join(out, "final")):
        return out, None
    resume = any(d.startswith("ckpt-") and not d.endswith(".tmp") for d in os.listdir(out)) if os.path.isdir(out) else False
    again = ["--resume"] if resume else ["--overwrite"]  # a start that died before its first checkpoint: again
    cmd = [sys.executable, "train.py", *flags, "--out", out, *again]
    print(("resume " if resume else "run ") + " ".join(cmd[1:]), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return out, {"wall_s": time.time() - t, "resumed": resume}


def install():
    import importlib.metadata
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            **{n: importlib.metadata.version(n) for n in ("torch", "transformers", "tokenizers", "numpy")}}


def summary(out, timing):
    r = rows(out)
    ev = [(x["iter"], x["eval_success_rate"]) for x in r if "eval_success_rate" in x]
    its = [x for x in r if "wall_s" in x]
    return {"eval": ev, "start": ev[0][1], "end": ev[-1][1], "gain": ev[-1][1] - ev[0][1],
            "sampled": [(x["iter"], x["success_rate"]) for x in its],
            "s_per_iteration": sum(x["wall_s"] for x in its) / max(len(its), 1),
            "run_wall_s": None if timing is None or timing["resumed"] else timing["wall_s"],
            "clipfrac": sum(x["clipfrac"] for x in its) / max(len(its), 1),
            "engine_kl_max": max((abs(x["engine_kl"]) for x in its), default=None),
            "command": json.load(open(os.path.join(out, "run.json")))["starts"][0]["command"], "install": install()}


def ci95(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return m, T975[len(xs) - 2] * sd / len(xs) ** 0.5


def tune_key(method: str, lr: str) -> str:
    """A tuning run's name: StepPO's as first recorded (tune-lr1e-5), a baseline's with its name (tune-PPO-lr1e-5)."""
    return f"tune-lr{lr}" if method == "StepPO" else f"tune-{method}-lr{lr}"


def load():
    return json.load(open(RESULTS)) if os.path.exists(RESULTS) else {"recipe": RECIPE, "runs": {}}


def save(res):
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)


def report(res, tag=None):
    print(f"recipe: {' '.join(RECIPE)} | warm start: {' '.join(WARM)} | RL: {' '.join(RL)}")
    by = {}
    for key, s in sorted(res["runs"].items()):
        method, _, seed = key.partition("/")
        stopped = f"  stopped after iteration {s['stopped_after']}" if s.get("stopped_after") is not None else ""
        print(f"{key:22s} eval {s['start']:.2f} -> {s['end']:.2f} ({s['gain']:+.2f})  {s['s_per_iteration']:.0f} s/it  "
              f"clipfrac {s['clipfrac']:.2f}  run {s['run_wall_s'] or float('nan'):.0f} s{stopped}")
        if not method.startswith("tune"):
            by.setdefault(method, []).append(s["gain"])
    for method, gains in by.items():
        m, h = ci95(gains)
        print(f"{method}: mean gain {m:+.3f}, 95% CI [{m - h:+.3f}, {m + h:+.3f}] over {len(gains)} seeds")
    plot(res, tag)


def plot(res, tag=None):
    """results/smollm2_multihop.png (PLOT): the tiny model's default run (seeds 0-2, 2026-11-27, results/default_run.json)
    beside SmolLM2's recipe (every reported run: a colour per method, StepPO solid, PPO / GRPO dotted, a marker per
    seed), held-out greedy success per iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    with open(os.path.join(ROOT, "bench", "results", "default_run.json")) as f:
        tiny = json.load(f)["rerun"]["seeds"]
    for seed, s in sorted(tiny.items()):
        left.plot(*zip(*s["eval"]), "o-", ms=3, label=f"seed {seed}")
    left.set(title="tiny model (1M, built here), python train.py", xlabel="iteration", ylabel="held-out greedy success",
             ylim=(-0.02, 1.02))
    tune = os.path.join(ROOT, "bench", "results", "smollm2_tune_seed100.json")
    if os.path.exists(tune) and not tag:  # how the recipe was chosen (dashed, validation questions; not a replication's)
        with open(tune) as f:
            right.plot(*zip(*json.load(f)["eval"]), "o--", ms=3, color="grey", label="seed 100 (tuning, valid split)")
    colors, labelled = {"StepPO": "tab:blue", "PPO": "tab:orange", "GRPO": "tab:green"}, set()
    for key, s in sorted(res["runs"].items(), key=lambda kv: (not kv[0].startswith("StepPO"), kv[0])):
        if key.startswith("tune"):
            continue
        method, seed = key.split("/seed")  # a colour per method (StepPO solid, the baselines dotted), a marker per seed
        seeds = sorted(k.split("/seed")[1] for k in res["runs"] if k.startswith(method + "/"))
        right.plot(*zip(*s["eval"]), "-" if method == "StepPO" else ":", marker="os^dv"[int(seed) % 5], ms=3.5,
                   color=colors.get(method, "black"),
                   label=None if method in labelled else f"{method}, seeds {', '.join(seeds)} (o s ^; eval split)")
        labelled.add(method)
    right.set(title="SmolLM2-135M-Instruct, bench/bench_smollm2.py" + (f"\n--tag {tag}" if tag else ""), xlabel="iteration")
    left.legend(fontsize=7)
    right.legend(fontsize=6.5, loc="upper left", framealpha=0.7)  # above the curves: none starts above 0.25
    fig.suptitle("Held-out success on multihop, 2 CPU cores (StepPO unless named)", fontsize=10)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="StepPO")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--tune", action="store_true", help="tuning seed 100 on the validation split: each of --methods at each of --lrs")
    ap.add_argument("--lrs", default="1e-5")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--time-warm-start", action="store_true",
                    help="the shared warm start again, alone, into runs/bench_smollm2/warm-retime: its wall time and "
                         "whether it repeats the recorded one's held-out success (the seeds keep using warm/final)")
    ap.add_argument("--tag", help="a replication (another machine): its own warm start, runs, results and plot, "
                                  "runs/bench_smollm2-TAG and results/smollm2-TAG.json / smollm2-TAG_multihop.png")
    args = ap.parse_args()
    if args.tag:
        if not args.tag.replace("-", "").replace("_", "").isalnum():
            raise SystemExit(f"--tag {args.tag!r}: letters, digits, - and _ only (it names a folder and files)")
        global RUNS, RESULTS, PLOT
        RUNS = f"{RUNS}-{args.tag}"
        RESULTS, PLOT = (os.path.join(ROOT, "bench", "results", f"smollm2-{args.tag}{end}") for end in (".json", "_multihop.png"))
    res = load()
    if args.report:
        return report(res, args.tag)
    if args.time_warm_start:
        shutil.rmtree(os.path.join(RUNS, "warm-retime"), ignore_errors=True)
        out, timing = run("warm-retime", [*RECIPE, *WARM], 0)
        recorded = res.setdefault("warm_start", {})  # none yet: the retimed run is the only one
        recorded["retimed_alone"] = again = {**summary(out, timing), "date": time.strftime("%Y-%m-%d")}
        save(res)
        print(f"warm start alone: {again['run_wall_s']:.0f} s; held-out {again['end']:.3f} "
              f"(recorded run: {recorded.get('end', float('nan')):.3f})")
        return None
    iters = int(RL[RL.index("--iters") + 1])
    name, flags, key = ("tune-warm", TUNE_WARM, "tune_warm_start") if args.tune else ("warm", WARM, "warm_start")
    warm, timing = run(name, [*RECIPE, *flags], 0)
    if timing is not None or key not in res:  # a skipped run keeps the wall time it was recorded with
        res[key] = {**summary(warm, timing), "flags": flags}
    save(res)
    model = os.path.join(warm, "final")
    jobs = ([(f"{tune_key(m, lr)}/seed{TUNE_SEED}", [*METHODS[m], "--lr", lr, "--eval-split", "valid", "--seed", str(TUNE_SEED)])
             for m in args.methods.split(",") for lr in args.lrs.split(",")] if args.tune else
            [(f"{m}/seed{s}", [*METHODS[m], "--seed", str(s)]) for m in args.methods.split(",") for s in map(int, args.seeds.split(","))])
    for name, flags in jobs:
        out, timing = run(name, [*RECIPE, *RL, "--model", model, *flags], iters)
        if timing is not None or name not in res["runs"]:
            res["runs"][name] = summary(out, timing)
        save(res)
    report(res, args.tag)


if __name__ == "__main__":
    main()
