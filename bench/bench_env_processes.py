"""Env steps/s with envs in this process (`--env-timeout 0`) and each in its own process (the default, envs/process.py).

    python bench/bench_env_processes.py                    # ALFWorld and multihop -> results/env_processes.json

`rollout.collect` plays the expert's episodes (no model: only the envs and the tokenizer work), `--envs` at a time,
the same task seeds in both modes; steps/s = env steps / wall seconds, the best of `--reps`. In processes, every live
episode's step is sent before any answer is read, so the envs step in parallel (up to the cores there are); the
price is a pickle round trip per call. Start-up (building the envs) is timed apart. Nothing is trained.
"""
import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import envs  # noqa: E402
from envs.process import close_all, make_envs  # noqa: E402
from model import load_tokenizer  # noqa: E402
from rollout import collect  # noqa: E402


def measure(env, n, episodes, reps, timeout, tok):
    t = time.perf_counter()
    pool = make_envs(env, {"split": "train"}, n, timeout)
    start_s = time.perf_counter() - t
    best, steps = float("inf"), 0
    for _ in range(reps):
        t = time.perf_counter()
        trajs = collect(None, pool, tok, [10_000_000 + i for i in range(episodes)], pool[0].max_steps, 256, 0.0,
                        max_len=1 << 20, expert=True)
        best = min(best, time.perf_counter() - t)
        steps = sum(len(tr.steps) for tr in trajs)
        assert not any(tr.error for tr in trajs), [tr.error for tr in trajs if tr.error][:1]
    close_all()
    return {"envs": n, "episodes": episodes, "env_steps": steps, "seconds": best, "steps_per_s": steps / best,
            "start_s": start_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs-list", default="alfworld,multihop")
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json-out", default=os.path.join(ROOT, "bench", "results", "env_processes.json"))
    args = ap.parse_args()
    tok = load_tokenizer("tiny")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    out = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "results": {}}
    for env in args.envs_list.split(","):
        if envs.check(env, "{}", ["train"]):
            print(f"{env}: skipped ({envs.check(env, '{}', ['train'])})")
            continue
        for mode, timeout in (("in-process", 0), ("processes", 600)):
            r = measure(env, args.envs, args.episodes, args.reps, timeout, tok)
            out["results"][f"{env}/{mode}"] = r
            print(f"{env:9s} {mode:10s}: {r['steps_per_s']:7.0f} env steps/s ({r['env_steps']} steps in "
                  f"{r['seconds']:.2f} s), building {args.envs} envs {r['start_s']:.2f} s", flush=True)
    with open(args.json_out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"-> {args.json_out}")


if __name__ == "__main__":
    main()
