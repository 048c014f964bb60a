"""Rollout throughput: environment steps/s and generated tokens/s against the number of parallel envs.

    python bench/bench_rollout.py                                   # HF engine -> bench/results/rollout.json
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 \\
        .venv-vllm/bin/python bench/bench_rollout.py --engine vllm  # -> bench/results/rollout_vllm.json
    python bench/bench_rollout.py --model smollm2-135m --n-envs 1,4,16     # -> rollout_smollm2-135m.json
    python bench/bench_rollout.py --env alfworld --n-envs 16 --max-steps 30 --max-new-tokens 24 --threads 2 \
        --reuse-cache off,on                     # HF engine with and without cross-turn KV reuse, side by side
                                                 # -> rollout_reuse_alfworld.json (each setting in its own process)

Policy: the tiny random Qwen2 (`--model` to change), env: multihop (random responses never parse, so every
episode runs max_steps turns: a steady load), fall back to the tests' CountEnv when envs/ is missing.
"""
import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from model import load_policy, resolve  # noqa: E402
from rollout import HFEngine, VLLMEngine, collect  # noqa: E402


def make_env(name):
    try:
        import envs
        return envs.make(name)
    except ImportError:
        from conftest import CountEnv
        return CountEnv()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--env", default="multihop")
    ap.add_argument("--n-envs", default="1,4,16,64")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--context", default="full")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (HF engine); tiny models: 1 is fastest")
    ap.add_argument("--reuse-cache", default="on", help="HF engine: on | off | off,on (each in its own process, "
                                                        "for its peak memory; written to rollout_reuse_<env>.json)")
    ap.add_argument("--json-out", default="", help="write the result here instead of bench/results/")
    args = ap.parse_args()
    if "," in args.reuse_cache:
        return compare(args)
    torch.set_num_threads(args.threads)

    model, tok = load_policy(args.model)
    t = time.perf_counter()
    if args.engine == "vllm":
        kw = dict(dtype="float32", max_model_len=4096) | ({} if torch.cuda.is_available() else dict(enforce_eager=True))
        engine = VLLMEngine(resolve(args.model), **kw)
    else:
        engine = HFEngine(model, tok, reuse_cache=args.reuse_cache == "on")
    startup = time.perf_counter() - t
    collect(engine, [make_env(args.env)], tok, [0], 1, 8, 1.0)  # warm-up
    rows = []
    for n in map(int, args.n_envs.split(",")):
        pool = [make_env(args.env) for _ in range(n)]
        t, before = time.perf_counter(), getattr(engine, "prefilled", 0)
        trajs = collect(engine, pool, tok, list(range(n)), args.max_steps, args.max_new_tokens, 1.0,
                        context=args.context, seed=0)
        dt = time.perf_counter() - t
        prefill = getattr(engine, "prefilled", 0) - before
        steps = sum(len(tr.steps) for tr in trajs)
        tokens = sum(len(s.action_ids) for tr in trajs for s in tr.steps)
        rows.append(dict(n_envs=n, seconds=round(dt, 3), env_steps=steps, gen_tokens=tokens,
                         env_steps_per_s=round(steps / dt, 2), gen_tokens_per_s=round(tokens / dt, 1),
                         mean_prompt_tokens=round(sum(len(s.prompt_ids) for tr in trajs for s in tr.steps) / steps),
                         prefill_tokens_per_episode=round(prefill / n) if args.engine == "hf" else None,
                         context_tokens_per_episode=round(sum(len(tr.steps[-1].prompt_ids) + len(tr.steps[-1].action_ids)
                                                              for tr in trajs) / n)))
        print(rows[-1], flush=True)
    res = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"cuda={torch.cuda.is_available()}", engine=args.engine, model=args.model, env=args.env,
               context=args.context, threads=torch.get_num_threads(), max_steps=args.max_steps,
               max_new_tokens=args.max_new_tokens,
               engine_startup_s=round(startup, 2), reuse_cache=args.reuse_cache if args.engine == "hf" else None,
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), rows=rows,
               sequences_sha256=hashlib.sha256(json.dumps([[s.action_ids for s in tr.steps] for tr in trajs])
                                               .encode()).hexdigest()[:16])
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f)
        return
    name = "rollout" + ("_vllm" if args.engine == "vllm" else "") + ("" if args.model == "tiny" else f"_{args.model}")
    out = os.path.join(ROOT, "bench", "results", name + ".json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", out)


def compare(args):
    """Each --reuse-cache setting in a fresh process (its own peak RSS), same seeds; one JSON with both and the ratio."""
    import subprocess
    import tempfile
    results = {}
    for setting in args.reuse_cache.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            argv = [a for a in sys.argv[1:] if not a.startswith("--reuse-cache") and a != args.reuse_cache]
            subprocess.run([sys.executable, __file__, *argv, "--reuse-cache", setting, "--json-out", f.name], check=True)
            results[setting] = json.load(open(f.name))
    on, off = results.get("on"), results.get("off")
    if on and off:
        results["speedup_gen_tokens_per_s"] = [round(a["gen_tokens_per_s"] / b["gen_tokens_per_s"], 2)
                                               for a, b in zip(on["rows"], off["rows"])]
        results["same_sequences"] = on["sequences_sha256"] == off["sequences_sha256"]
        print("speedup", results["speedup_gen_tokens_per_s"], "same sequences", results["same_sequences"])
    name = f"rollout_reuse_{args.env}" + ("" if args.model == "tiny" else f"_{args.model}")
    out = os.path.join(ROOT, "bench", "results", name + ".json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
