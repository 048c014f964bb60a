"""Why multihop episodes fail: greedy episodes of saved policies, each sorted into one outcome.

    python train.py --iters 0 --seed 101 --eval-split valid --out runs/ws101      # a warm start alone
    python train.py --seed 101 --eval-split valid --out runs/rl101                # the same warm start + RL
    python bench/bench_failures.py runs/ws101/final runs/rl101/final --split valid

Outcomes, first match wins (the expert's chain is path[0] -> ... -> path[-1], the answer):
  won; invalid (some step had no parsable action); no answer (ran out of steps); wrong first search (not the
  entity the question names); off the chain at hop k (a later search is not the next entity); answered early
  (stopped before the last hop, all searches right); searched past the chain; right searches, wrong answer.
Tells apart what RL can fix by choosing differently (answering early) from what needs reading or copying that
the model cannot do (wrong searches). Results: bench/results/failures.md (the exact commands are in it).
"""
import argparse
import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import envs  # noqa: E402
from envs.multihop import normalize, parse_call  # noqa: E402
from model import load_policy  # noqa: E402
from rollout import HFEngine, collect  # noqa: E402

OUTCOMES = ["won", "invalid", "no answer", "wrong first search", "off the chain (hop >= 2)", "answered early",
            "searched past the chain", "right searches, wrong answer"]


def outcome(env, traj) -> str:
    """One episode's outcome; `env` has been reset to the episode's seed (its chain is env.path)."""
    if traj.success:
        return "won"
    calls = [parse_call(s.action_text) for s in traj.steps]
    if any(c is None for c in calls):
        return "invalid"
    if not calls or calls[-1][0] != "answer":
        return "no answer"
    got = [normalize(c[1]) for c in calls if c[0] == "search"]
    want = [normalize(n) for n in env.path[:-1]]  # the entities to search, in order
    if not got or got[0] != want[0]:
        return "wrong first search"
    for g, w in zip(got, want):
        if g != w:
            return "off the chain (hop >= 2)"
    if len(got) < len(want):
        return "answered early"
    return "searched past the chain" if len(got) > len(want) else "right searches, wrong answer"


def breakdown(path, split, episodes, env_kwargs) -> dict:
    policy, tok = load_policy(path)
    env_list = [envs.make("multihop", split=split, **env_kwargs) for _ in range(32)]
    trajs = collect(HFEngine(policy.eval(), tok), env_list, tok, list(range(episodes)), env_list[0].max_steps,
                    32, 0.0, seed=0)  # greedy, the seeds train.py's evaluation uses
    probe, counts, hops = env_list[0], collections.Counter(), collections.defaultdict(list)
    for seed, t in zip(range(episodes), trajs):
        probe.reset(seed)
        counts[outcome(probe, t)] += 1
        hops[len(probe.path) - 1].append(t.success)
    return {"model": path, "split": split, "episodes": episodes, "outcomes": {k: counts[k] for k in OUTCOMES},
            "success_by_hops": {h: sum(v) / len(v) for h, v in sorted(hops.items())}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="saved policies (a run's final/ folder)")
    p.add_argument("--split", default="valid", choices=["train", "valid", "eval"])
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--env-kwargs", default="{}", help="JSON, as train.py's")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "failures.json"))
    args = p.parse_args()
    rows = [breakdown(m, args.split, args.episodes, json.loads(args.env_kwargs)) for m in args.models]
    print("| model | " + " | ".join(OUTCOMES) + " | success by hops |")
    print("|---|" + "---|" * (len(OUTCOMES) + 1))
    for r in rows:
        by_hops = ", ".join(f"{h}: {s:.2f}" for h, s in r["success_by_hops"].items())
        print(f"| {r['model']} | " + " | ".join(str(r["outcomes"][k]) for k in OUTCOMES) + f" | {by_hops} |")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=1)
