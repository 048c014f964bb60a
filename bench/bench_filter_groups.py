"""Dynamic sampling (`--filter-groups`, DAPO) against none, on the default run (tiny model, multihop, StepPO).

    python bench/bench_filter_groups.py             # seeds 0-2, with and without -> results/filter_groups.json
    python bench/bench_filter_groups.py --report    # the tables and results/filter_groups_multihop.png

Each seed has one warm start (`python train.py --iters 0 --seed k`), shared by its two runs (`--model <warm>/final
--sft-steps 0 --seed k`, the same as two whole default runs: test_iters_zero_is_a_warm_start_other_runs_can_share);
everything else is train.py's defaults (60 iterations of 32 episodes, lr 1e-4), with `--filter-groups` at its
default bound (`--filter-rounds 3`). Nothing was tuned for this comparison.
Two budgets: equal iterations (both runs make 60 updates of 32 trajectories; the filtered run plays more episodes),
and equal episodes played, the issue's question: the filtered run's held-out success at its last evaluation before
its episodes played (`played_episodes`, summed) exceed the unfiltered run's 60 x 32 = 1,920.
One run at a time at one thread (OMP_NUM_THREADS=1), resumable: a finished run is skipped, an interrupted one
continues with --resume; each finished run's summary goes to results/filter_groups.json as it ends, with the machine.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_smollm2 import ci95, install  # noqa: E402  (same statistics and install record)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "runs", "bench_filter_groups")
RESULTS = os.path.join(ROOT, "bench", "results", "filter_groups.json")
ARMS = {"off": [], "on": ["--filter-groups"]}
SEEDS, ITERS, EPISODES = [0, 1, 2], 60, 32  # train.py's --iters and --envs-per-iter defaults


def rows(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run(out, flags, iters):
    """train.py with `flags` into `out`: skipped when finished, resumed when interrupted. Returns the wall time or None."""
    if any(r["iter"] == iters for r in rows(out)) and os.path.isdir(os.path.join(out, "final")):
        return None
    resume = os.path.isdir(out) and any(d.startswith("ckpt-") and not d.endswith(".tmp") for d in os.listdir(out))
    again = ["--resume"] if resume else ["--overwrite"]  # a start that died before its first checkpoint: again
    cmd = [sys.executable, "train.py", *flags, "--out", out, *again]
    print(("resume " if resume else "run ") + " ".join(cmd[1:]), flush=True)
    t = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    return None if resume else time.time() - t


def summary(out, wall_s):
    """Held-out success per evaluation with the episodes played before it (first round and extra rounds)."""
    r = rows(out)
    played = {x["iter"]: x.get("played_episodes", EPISODES) for x in r if "wall_s" in x}
    evals = [(x["iter"], x["eval_success_rate"], sum(n for i, n in played.items() if i < x["iter"]))
             for x in r if "eval_success_rate" in x]
    its = [x for x in r if "wall_s" in x]
    mean = lambda k: sum(x.get(k, 0.0) for x in its) / max(len(its), 1)  # noqa: E731
    return {"eval": evals, "played_episodes": sum(played.values()), "filtered_groups": mean("filtered_groups"),
            "sampling_rounds": mean("sampling_rounds"), "s_per_iteration": mean("wall_s"), "run_wall_s": wall_s,
            "command": json.load(open(os.path.join(out, "run.json")))["starts"][0]["command"], "install": install()}


def at_budget(evals, budget):
    """(iteration, success) of the last evaluation made before more than `budget` episodes were played."""
    return max((e for e in evals if e[2] <= budget), key=lambda e: e[0])[:2]


def load():
    return json.load(open(RESULTS)) if os.path.exists(RESULTS) else {"runs": {}}


def save(res):
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)


def report(res):
    runs, budget = res["runs"], ITERS * EPISODES
    seeds = sorted({int(k.split("seed")[1]) for k in runs if k.startswith("on/") and f"off/seed{k.split('seed')[1]}" in runs})
    print(f"seeds with both arms: {seeds}")
    for arm in ARMS:
        for s in seeds:
            r = runs[f"{arm}/seed{s}"]
            it, succ = at_budget(r["eval"], budget)
            print(f"{arm:3s} seed {s}: start {r['eval'][0][1]:.3f} end {r['eval'][-1][1]:.3f} (iter {r['eval'][-1][0]}, "
                  f"{r['played_episodes']} episodes) | at {budget} episodes: {succ:.3f} (iter {it}) | filtered "
                  f"{r['filtered_groups']:.2f}, rounds {r['sampling_rounds']:.2f} | {r['s_per_iteration']:.1f} s/it")
    for name, pick in (("equal iterations", lambda r: r["eval"][-1][1]), (f"equal episodes ({budget})",
                                                                          lambda r: at_budget(r["eval"], budget)[1])):
        on = [pick(runs[f"on/seed{s}"]) for s in seeds]
        off = [pick(runs[f"off/seed{s}"]) for s in seeds]
        for label, xs in (("off", off), ("on", on), ("on - off (paired)", [a - b for a, b in zip(on, off)])):
            m, h = ci95(xs) if xs else (float("nan"),) * 2
            print(f"{name:28s} {label:18s} {m:+.3f} ± {h:.3f} (95% CI, {len(xs)} seeds)")
    plot(res, seeds)


def plot(res, seeds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for arm, style in (("off", "o-"), ("on", "s--")):
        for s in seeds:
            ev = res["runs"][f"{arm}/seed{s}"]["eval"]
            ax.plot([e[2] for e in ev], [e[1] for e in ev], style, ms=3, color=f"C{s}",
                    label=f"seed {s}, {'--filter-groups' if arm == 'on' else 'no filter'}")
    ax.axvline(ITERS * EPISODES, color="grey", lw=0.8)
    ax.set(xlabel="episodes played", ylabel="held-out greedy success", ylim=(-0.02, 1.02),
           title="dynamic sampling on the default run (tiny model, multihop)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "bench", "results", "filter_groups_multihop.png"), dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if not args.report:
        for seed in map(int, args.seeds.split(",")):
            warm = os.path.join(RUNS, "warm", f"seed{seed}")
            run(warm, ["--iters", "0", "--seed", str(seed)], 0)
            for arm, flags in ARMS.items():
                out = os.path.join(RUNS, arm, f"seed{seed}")
                wall = run(out, ["--model", os.path.join(warm, "final"), "--sft-steps", "0", "--seed", str(seed), *flags],
                           ITERS)
                res = load()
                if wall is not None or f"{arm}/seed{seed}" not in res["runs"]:
                    res["runs"][f"{arm}/seed{seed}"] = summary(out, wall)
                    save(res)
    report(load())


if __name__ == "__main__":
    main()
