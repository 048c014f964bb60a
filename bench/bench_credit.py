"""Time credit assignment on 1,000,000 steps (50,000 trajectories x 20 steps) and token GAE on 1,000,000 tokens.

    python bench/bench_credit.py        # writes bench/results/credit.json
"""
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from credit import gigpo, grpo, step_gae, token_gae, whiten  # noqa: E402
from timing import best_of  # noqa: E402


def seconds(fn) -> float:
    return best_of(fn, 3)[0]


def main():
    torch.manual_seed(0)
    N, T = 50_000, 20
    mask = torch.ones(N, T)
    rewards = (torch.rand(N, T) < 0.05).float() * mask
    values = torch.randn(N, T) * mask
    groups = torch.arange(N) // 8  # groups of 8 trajectories per task
    states = torch.randint(0, 50, (N, T))  # anchor states: 50 distinct observations per task
    steps = int(mask.sum())
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "trajectories": N, "max_steps": T, "steps": steps,
        "step_gae_s": seconds(lambda: step_gae(rewards, values, mask, 0.99, 0.95)),
        "whiten_s": seconds(lambda: whiten(values, mask)),
        "grpo_s": seconds(lambda: grpo(rewards.sum(1), groups)),
        "gigpo_s": seconds(lambda: gigpo(rewards, mask, groups, states, 0.99)),
    }
    # token-level GAE runs one recursion step per token: 1,000,000 tokens as 2,000 trajectories x 500 tokens
    tok = torch.zeros(2000, 500)
    res["token_gae_1m_tokens_s"] = seconds(lambda: token_gae(tok, tok, torch.ones_like(tok), 0.99, 0.95))
    print(json.dumps(res, indent=2))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "credit.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
