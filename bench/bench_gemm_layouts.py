"""The three matrix products of a linear layer's training step, each alone, at SmolLM2-135M's shapes: how fast this
CPU runs the layout each one has.

    python bench/bench_gemm_layouts.py                 # bf16 and fp32 -> bench/results/gemm_layouts.json
    python bench/bench_gemm_layouts.py --tokens 2048 --dtypes bf16 --json-out /tmp/g.json

A linear layer y = x W^T over T tokens (x: T x K, W: N x K) costs 2 T K N FLOP three times:
- forward:        x @ W^T          (T x K) times a transposed weight (what nn.Linear passes the GEMM);
- input gradient: dy @ W           (T x N) times the weight as stored;
- weight gradient: dy^T @ x        a transposed (N x T) view of dy times x, reduced over the T tokens (autograd's).
The weight gradient is the one whose first operand is transposed. On a 2-core Xeon with AMX it ran at about half the
others' rate (docs/benchmarks.md), which is most of what keeps the bf16 update below 30% of the GEMM rate. Each
product is the best of `--reps` calls on operands already in cache, with fresh outputs freed at once: the kernel's own
speed, not the update's (whose operands stream from memory). Shapes: SmolLM2-135M's projections (K, N) = (576, 1536)
gate / up, (1536, 576) down, (576, 576) q / o, (576, 192) k / v; T = the update's micro-batch (2,462 real tokens in
the CPU-limit benchmark's first minibatch).
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
import records  # noqa: E402
import train  # noqa: E402
from timing import best_of  # noqa: E402

SHAPES = {"gate/up": (576, 1536), "down": (1536, 576), "q/o": (576, 576), "k/v": (576, 192)}  # (K, N)


def rate(product, flop: int, reps: int, budget_s: float = 60.0) -> float:
    """GFLOP/s of the best of `reps` calls of `product` (after 3 untimed ones; fewer past `budget_s` seconds)."""
    return flop / best_of(product, reps, warmup=3, budget_s=budget_s)[0] / 1e9


def layouts(T: int, K: int, N: int, dtype, reps: int) -> dict:
    """GFLOP/s of the forward, input-gradient and weight-gradient products of one (N x K) linear layer over T tokens."""
    g = torch.Generator().manual_seed(0)
    x, dy, w = (torch.randn(*s, generator=g).to(dtype) for s in ((T, K), (T, N), (N, K)))
    flop = 2 * T * K * N
    return {"forward": rate(lambda: x @ w.t(), flop, reps), "input_grad": rate(lambda: dy @ w, flop, reps),
            "weight_grad": rate(lambda: dy.t() @ x, flop, reps)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2462)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json-out", default=os.path.join(ROOT, "bench", "results", "gemm_layouts.json"))
    args = ap.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    out = {}
    for name in args.dtypes.split(","):
        for layer, (K, N) in SHAPES.items():
            r = out.setdefault(name, {})[layer] = layouts(args.tokens, K, N, dtypes[name], args.reps)
            print(f"{name} {layer:8s} T={args.tokens} K={K} N={N}: " + "  ".join(f"{k} {v:6.0f}" for k, v in r.items())
                  + f"  (weight_grad / forward {r['weight_grad'] / r['forward']:.2f})", flush=True)
    record = {"tokens": args.tokens, "machine": records.run_record(train.Config())["cpu"],
              "threads": torch.get_num_threads(), "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
              "python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "gflop_per_s": out}
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"-> {args.json_out}")


if __name__ == "__main__":
    main()
