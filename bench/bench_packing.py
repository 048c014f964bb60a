"""Packed trajectories (one row per episode) vs one row per step: tokens forwarded, time per update, same gradients.

    python bench/bench_packing.py            # tiny model; writes bench/results/packing.json
    python bench/bench_packing.py --model smollm2-135m

A T-step episode with a growing context costs sum_t |s_t + a_t| tokens as one row per step, but only
|s_T + a_T| packed (StepPO's shared-prefix reuse): about (T + 1) / 2 times fewer when the prompt is short.
"""
import argparse
import json
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import load_policy, pad_id  # noqa: E402
from step_mdp import Step, Trajectory, collate  # noqa: E402
from steppo_loss import step_policy_loss, token_logprobs  # noqa: E402


def episodes(n, T, vocab, prompt=64, action=24, env_msg=24, seed=0):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ctx, steps = [rnd.randrange(10, vocab) for _ in range(prompt)], []
        for t in range(T):
            act = [rnd.randrange(10, vocab) for _ in range(action)]
            steps.append(Step(list(ctx), act, [-1.0] * action, reward=float(t == T - 1)))
            ctx = ctx + act + [rnd.randrange(10, vocab) for _ in range(env_msg)]
        out.append(Trajectory(steps, f"task{i}", terminated=True))
    return out


def update_cost(model, batch, adv):
    """One forward + backward of the step loss; returns (seconds, tokens forwarded, flat gradient)."""
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = batch.gather_steps(token_logprobs(logits, batch.input_ids))
    loss, _ = step_policy_loss(lp, batch.gather_steps(batch.engine_logprobs), adv, batch.action_step_mask, 0.2, 0.2)
    loss.backward()
    secs = time.perf_counter() - t
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return secs, int(batch.attention_mask.sum()), int(batch.input_ids.numel()), grad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--episodes", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_policy(args.model)
    model.train()
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "model": args.model, "episodes_per_update": args.episodes,
           "shape": "prompt 64 + T x (action 24 + env message 24) tokens", "rows": []}
    for T in (5, 10, 20):
        trajs = episodes(args.episodes, T, len(tok))
        adv = torch.randn(args.episodes * T, generator=torch.Generator().manual_seed(T))
        row = {"T": T}
        grads = {}
        for name, pack in (("per_step", False), ("packed", True)):
            b = collate(trajs, pad_id(tok), pack=pack)
            update_cost(model, b, adv)  # warm-up
            secs = min(update_cost(model, b, adv)[0] for _ in range(2))
            _, real, padded, grads[name] = update_cost(model, b, adv)
            row[name] = {"rows": b.input_ids.shape[0], "tokens": real, "padded_tokens": padded, "update_s": secs}
        row["token_ratio"] = row["per_step"]["tokens"] / row["packed"]["tokens"]
        row["expected_ratio_(T+1)/2"] = (T + 1) / 2
        row["speedup"] = row["per_step"]["update_s"] / row["packed"]["update_s"]
        diff = (grads["per_step"] - grads["packed"]).abs().max().item()
        row["max_grad_diff"] = diff
        row["grad_rel_diff"] = diff / grads["per_step"].abs().max().item()
        res["rows"].append(row)
        print(json.dumps(row))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"packing_{args.model}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
