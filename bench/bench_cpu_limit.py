"""How close the trainer gets to the CPU's own limit: GEMM rates, then SmolLM2-135M's update, no-grad pass and
generation, each as a fraction of the GEMM rate measured in the same run.

    python bench/bench_cpu_limit.py                          # SmolLM2-135M, fp32 and bf16 -> bench/results/cpu_limit.json
    python bench/bench_cpu_limit.py --compile                # ... and each dtype again under train.py --compile
    python bench/bench_cpu_limit.py --compile --remove-padding   # ... and again under --compile --remove-padding
    python bench/bench_cpu_limit.py --model tiny --dtypes bf16 --json-out /tmp/x.json    # a quick look

The machine's limit: the best of 10 square 2048 x 2048 matrix products (2 M N K FLOP each) in fp32 and in bf16, on
every thread torch uses (fewer past 60 s: on a CPU without bf16 instructions one bf16 product takes minutes),
measured before the models and again after them; each share below is against the higher of
the two (the machine's speed drifts within a run). After the models, the forward product of each of the model's
linear shapes over one micro-batch of the update's tokens is timed too, and each part's share of the best GEMM rate
measured at any shape is recorded beside it (`of_best_bf16_gemm`): a square 2048^3 product is not always the fastest
this machine runs (on a machine whose memory was slow it ran at a third of SmolLM2's own products' rate). The work is train.py's own functions on train.py's layout (`scale.load_models`: under
--dtype bf16 one process computes with a bf16 twin over fp32 master weights), on multihop:
- update (`learner.update`, policy + critic, AdamW steps included): tokens/s over the collated rows' tokens, FLOP/s =
  6 x (policy + critic parameters) x tokens; the first call (the optimisers' state is allocated) is not timed;
- no-grad pass (`learner.no_grad_pass`: pi_old, reference, critic): FLOP/s = 2 x (policy + reference + critic) x tokens;
- generation (`rollout.collect`, HF engine with cross-turn KV reuse, sampled, 16 episodes of 4 turns x 32 tokens):
  generated tokens/s, FLOP/s = 2 x policy parameters x (prefilled + generated tokens).
The update and the no-grad pass run on 16 expert episodes (the length of a warm-started policy's: 2-5 turns,
~150-250 tokens with SmolLM2's tokenizer), 2 minibatches of 8, --micro-tokens 4096 (the LM head at action tokens).
Results, with the CPU model and library versions: docs/benchmarks.md. Freed memory stays in the process, as in
train.py on the CPU (scale.keep_freed_memory); BENCH_MALLOC_DEFAULT=1 keeps glibc's default, for the comparison in
results/cpu_limit_malloc.json.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import envs  # noqa: E402
import records  # noqa: E402
import scale  # noqa: E402
import learner  # noqa: E402
import train  # noqa: E402
from model import pad_id as get_pad_id  # noqa: E402
from rollout import HFEngine, collect  # noqa: E402
from bench_gemm_layouts import rate  # noqa: E402
from timing import best_of  # noqa: E402


def gemm_rate(dtype, n=2048, reps=10) -> float:
    """GFLOP/s of the best of `reps` n x n x n products (after 3 untimed ones; fewer past 60 s)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return rate(lambda: a @ b, 2 * n ** 3, reps)


def layer_gemm_rates(shapes: list, tokens: int, dtype, reps=10) -> dict:
    """GFLOP/s of the forward product x @ W^T (x: tokens x K, W: N x K) for each (N, K) in `shapes`, best of `reps`
    (bench_gemm_layouts.py times all three products of a layer)."""
    out = {}
    for N, K in shapes:
        x, w = torch.randn(tokens, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
        out[f"{N}x{K}"] = rate(lambda: x @ w.t(), 2 * tokens * K * N, reps)
    return out


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters()) if model is not None else 0


def measure(model_name: str, dtype: str, episodes: int, reps: int, flags: list) -> dict:
    cfg = train.parse_config(["--model", model_name, "--dtype", dtype, "--micro-tokens", "4096", *flags,
                              "--envs-per-iter", str(episodes), "--out", "/tmp/bench_cpu_limit"])
    device = torch.device("cpu")
    if os.environ.get("BENCH_MALLOC_DEFAULT") != "1":  # as train.py on the CPU; 1: glibc's default, for comparison
        scale.keep_freed_memory()
    policy, policy_ddp, critic, critic_ddp, ref, tok = scale.load_models(cfg, device, "step")
    computes, pad_id = scale.unwrap(policy_ddp), get_pad_id(tok)
    opt_p, opt_c = scale.adamw(scale.trained(policy), cfg.lr, cfg), scale.adamw(scale.trained(critic), cfg.critic_lr, cfg)
    P_pol, P_crit, P_ref = n_params(policy), n_params(critic), n_params(ref)
    env_list = [envs.make("multihop", split="train") for _ in range(episodes)]
    computes.eval()

    # generation: sampled, reuse on, untrained responses rarely parse, so episodes run their 4 turns (a steady load)
    engine = HFEngine(computes, tok, reuse_cache=True)
    collect(engine, env_list[:2], tok, [0, 1], 2, 8, 1.0, seed=0)  # warm-up
    engine.sync(computes)
    engine.prefilled, t = 0, time.perf_counter()
    gen = collect(engine, env_list, tok, list(range(episodes)), 4, 32, 1.0, seed=1)
    t_gen = time.perf_counter() - t
    generated = sum(len(s.action_ids) for tr in gen for s in tr.steps)

    # the update's data: expert episodes (a warm-started policy's lengths)
    trajs = collect(engine, env_list, tok, [10_000_000 + i for i in range(episodes)], 8, 256, 0.0, expert=True)
    batches = learner.minibatches(cfg, trajs, pad_id, device, torch.Generator().manual_seed(0))
    tokens = sum(int(m.b.attention_mask.sum()) for mb in batches for m in mb if m.real)
    positions = sum(m.b.attention_mask.numel() for mb in batches for m in mb if m.real)  # with padding
    computes.train()
    nograd = lambda: learner.no_grad_pass(cfg, computes, scale.unwrap(critic_ddp), ref, batches, trajs, pad_id, device)  # noqa: E731
    nograd()  # --compile: the no-grad pass's layers compile
    t_fwd, fwd = best_of(nograd, reps)
    learner.compute_advantages(cfg, trajs, batches, fwd["boot"], device)
    upd = lambda: learner.update(cfg, policy_ddp, critic_ddp, opt_p, opt_c, batches, device)  # noqa: E731
    t_first = time.perf_counter()
    upd()  # the optimisers allocate their state (--compile: the update's layers compile)
    t_first = time.perf_counter() - t_first
    t_upd, st = best_of(upd, reps)
    assert st["train_tokens"] == tokens
    shapes = sorted({tuple(m.weight.shape) for layer in scale.decoder_layers(computes) for m in layer.modules()
                     if isinstance(m, torch.nn.Linear)})
    micro_tokens = max(int(m.b.attention_mask.sum()) for mb in batches for m in mb)
    return {"dtype": dtype, "flags": flags, "first_update_s": t_first, "linear_shapes": shapes, "micro_batch_tokens": micro_tokens, "params": {"policy": P_pol, "critic": P_crit, "reference": P_ref},
            "update": {"tokens": tokens, "padded_positions": positions, "seconds": t_upd, "tokens_per_s": tokens / t_upd,
                       "gflop_per_s": 6 * (P_pol + P_crit) * tokens / t_upd / 1e9},
            "no_grad_pass": {"tokens": tokens, "seconds": t_fwd, "tokens_per_s": tokens / t_fwd,
                             "gflop_per_s": 2 * (P_pol + P_crit + P_ref) * tokens / t_fwd / 1e9},
            "generation": {"episodes": episodes, "generated": generated, "prefilled": engine.prefilled,
                           "seconds": t_gen, "tokens_per_s": generated / t_gen,
                           "gflop_per_s": 2 * P_pol * (generated + engine.prefilled) / t_gen / 1e9}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="measure every dtype eager, then under --compile")
    ap.add_argument("--remove-padding", action="store_true", help="... then under --remove-padding (with --compile: both)")
    ap.add_argument("--reps", type=int, default=2, help="timed repeats of the update and the no-grad pass (best kept)")
    ap.add_argument("--json-out", default=os.path.join(ROOT, "bench", "results", "cpu_limit.json"))
    args = ap.parse_args()
    gemm = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    print(f"GEMM 2048^3: fp32 {gemm['fp32']:.4g} GFLOP/s, bf16 {gemm['bf16']:.4g} GFLOP/s", flush=True)
    settings = [[]] + [["--compile"]] * args.compile + [["--compile"] * args.compile + ["--remove-padding"]] * args.remove_padding
    runs = []
    for flags in settings:
        for dtype in args.dtypes.split(","):
            runs.append(measure(args.model, dtype, args.episodes, args.reps, flags))
            print(f"{dtype} {' '.join(flags) or 'eager'}: " + ", ".join(f"{part} {runs[-1][part]['tokens_per_s']:.0f} tokens/s"
                                                                  for part in ("update", "no_grad_pass", "generation")), flush=True)
    gemm_after = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    print(f"GEMM 2048^3 after the models: fp32 {gemm_after['fp32']:.4g} GFLOP/s, bf16 {gemm_after['bf16']:.4g} GFLOP/s", flush=True)
    limit = {d: max(gemm[d], gemm_after[d]) for d in gemm}
    # the model's own products (its linear layers' shapes over a micro-batch of the update's tokens), after the models
    layers = {d: layer_gemm_rates(runs[0]["linear_shapes"], runs[0]["micro_batch_tokens"], dt)
              for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"GEMM at the model's shapes ({runs[0]['micro_batch_tokens']} tokens): " + "; ".join(
        f"{d} " + ", ".join(f"{k} {v:.0f}" for k, v in layers[d].items()) for d in layers), flush=True)
    best = {d: max(limit[d], *layers[d].values()) for d in limit}
    for r in runs:
        for part in ("update", "no_grad_pass", "generation"):
            r[part]["of_bf16_gemm"] = r[part]["gflop_per_s"] / limit["bf16"]
            r[part]["of_own_gemm"] = r[part]["gflop_per_s"] / limit[r["dtype"]]
            r[part]["of_best_bf16_gemm"] = r[part]["gflop_per_s"] / best["bf16"]
            print(f"{r['dtype']} {' '.join(r['flags']) or 'eager'} {part}: {r[part]['tokens_per_s']:.0f} tokens/s, "
                  f"{r[part]['gflop_per_s']:.0f} GFLOP/s = {100 * r[part]['of_bf16_gemm']:.0f}% of the bf16 GEMM rate, "
                  f"{100 * r[part]['of_best_bf16_gemm']:.0f}% of the best bf16 GEMM measured", flush=True)
    by, speedup = {(r["dtype"], " ".join(r["flags"]) or "eager"): r for r in runs}, {}
    for name in dict.fromkeys(" ".join(f) or "eager" for f in settings):  # bf16 over fp32, like for like
        if ("bf16", name) in by and ("fp32", name) in by:
            speedup[name] = {p: by["bf16", name][p]["tokens_per_s"] / by["fp32", name][p]["tokens_per_s"]
                             for p in ("update", "no_grad_pass", "generation")}
            print(f"bf16 / fp32 tokens/s ({name}): " + ", ".join(f"{k} {v:.2f}x" for k, v in speedup[name].items()))
    import importlib.metadata
    versions = {n: importlib.metadata.version(n) for n in ("torch", "transformers")}
    record = {"model": args.model, "machine": records.run_record(train.Config())["cpu"], "threads": torch.get_num_threads(),
              "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
              "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
              "python": platform.python_version(), "versions": versions, "date": time.strftime("%Y-%m-%d"),
              "gemm_gflop_per_s": gemm, "gemm_gflop_per_s_after": gemm_after, "gemm_gflop_per_s_model_shapes": layers,
              "runs": runs, "bf16_over_fp32": speedup or None}
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"-> {args.json_out}")


if __name__ == "__main__":
    main()
