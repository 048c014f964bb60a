"""Environment speed: reset and step times for ALFWorld and multihop, ALFWorld game generation time,
and the experts' win rates per ALFWorld task type (planner and handcoded, 30 steps). Writes bench/results/envs.json.

    python bench/bench_envs.py            # ~2 minutes on 2 CPU cores
"""
import collections
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
from envs import alfworld_gen  # noqa: E402


def stats(xs):
    return dict(n=len(xs), mean_ms=1e3 * statistics.mean(xs), median_ms=1e3 * statistics.median(xs))


def play(env, seeds):
    """Expert episodes; returns reset times, step times and per-task-type (wins, games)."""
    resets, steps, wins = [], [], collections.defaultdict(lambda: [0, 0])
    for seed in seeds:
        t = time.perf_counter()
        obs, info = env.reset(seed)
        resets.append(time.perf_counter() - t)
        done = False
        while not done:
            t = time.perf_counter()
            obs, reward, done, info = env.step(info["expert"])
            steps.append(time.perf_counter() - t)
        key = info["task_id"].split("/")[2].split("-")[0] if "json_2.1.1" in info["task_id"] else "all"
        wins[key][0] += int(info["won"])
        wins[key][1] += 1
    return resets, steps, {k: dict(wins=w, games=n) for k, (w, n) in sorted(wins.items())}


def bench_alfworld(label, n_games, **scene):
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        env = envs.make("alfworld", split="train", n_games=n_games, cache_dir=cache, **scene)
        gen = time.perf_counter() - t
        cold, steps, wins = play(env, range(n_games))      # first time each game: parse domain + grammar
        warm, steps2, _ = play(env, range(n_games))         # parsed logic cached per env
        same, _, _ = play(env, [0] * 10)                    # replaying the loaded game
        plan = [len(json.load(open(g))["walkthrough"]) for g in env.games]
    return dict(scene=label, n_games=n_games, generation_s_per_game=gen / n_games,
                reset_new_game_cold=stats(cold), reset_new_game_warm=stats(warm), reset_same_game=stats(same),
                step=stats(steps + steps2), expert_plan_len_mean=statistics.mean(plan),
                expert_plan_len_max=max(plan), expert_wins=wins)


def main():
    out = dict(machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version()))
    mh = envs.make("multihop", expert_slip=0.0)  # the infallible expert: its win rate checks the tasks
    resets, steps, wins = play(mh, range(len(mh)))
    out["multihop"] = dict(n_tasks_train=len(mh), n_tasks_eval=len(envs.make("multihop", split="eval")),
                           reset=stats(resets), step=stats(steps), expert_wins=wins)
    print("multihop", out["multihop"])
    out["alfworld_small"] = bench_alfworld("default: n_receptacles=4, n_distractors=1", 24)
    print("alfworld small", out["alfworld_small"])
    out["alfworld_large"] = bench_alfworld("large: n_receptacles=12, n_distractors=8", 12, n_receptacles=12,
                                           n_distractors=8, max_plan_len=20)
    print("alfworld large", out["alfworld_large"])
    default = envs.make("alfworld", split="train")  # the default pool (cached): expert win rate per task type
    _, _, wins = play(default, range(len(default)))
    out["alfworld_default_pool_expert_wins"] = wins
    print("default pool", wins)
    random.seed(0)  # the handcoded agent draws from Python's global random (train.py seeds it too)
    handcoded = envs.make("alfworld", split="train", expert="handcoded")  # the rule-based agent, same 60 games
    _, _, wins = play(handcoded, range(len(handcoded)))
    out["alfworld_default_pool_handcoded_expert_wins"] = wins
    print("default pool, handcoded expert", wins)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "envs.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump(out, open(path, "w"), indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
