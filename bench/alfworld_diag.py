"""Where a model's greedy ALFWorld episodes go: does it reach the last action of the task (the planner's remaining
plan is one action), and does it take it there or `look` (the slipping expert's habit)?

    python bench/alfworld_diag.py runs/alf_hc/warm100/final --split valid --episodes 64 --env-kwargs '{...}'

Plays `--episodes` games as train.py's evaluation does (greedy, full context, seeds 0..n-1) and prints counts.
"""
import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs.alfworld import AlfWorldEnv, parse_action  # noqa: E402
from model import load_policy  # noqa: E402
from rollout import HFEngine, collect  # noqa: E402


class Recorded(AlfWorldEnv):
    """AlfWorldEnv that logs, per step: (state was one action from the goal, action, invalid, expert's action)."""
    log = collections.defaultdict(list)

    def reset(self, seed):
        self.seed = seed
        return super().reset(seed)

    def step(self, response):
        near = len(self._state.get("policy_commands") or []) == 1
        expert = parse_action(self._info(invalid=False, action=None)["expert"])
        obs, reward, done, info = super().step(response)
        self.log[self.seed].append((near, info["action"], info["invalid"], expert))
        return obs, reward, done, info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--split", default="valid")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--env-kwargs", default="{}")
    a = p.parse_args()
    policy, tok = load_policy(a.model)
    env_list = [Recorded(split=a.split, **json.loads(a.env_kwargs)) for _ in range(16)]
    trajs = collect(HFEngine(policy, tok), env_list, tok, list(range(a.episodes)), a.max_steps, a.max_new_tokens, 0.0,
                    context="full", seed=0)
    steps = [s for ep in Recorded.log.values() for s in ep]
    out = dict(episodes=len(trajs), won=sum(t.success for t in trajs),
               reached_last_action=sum(any(s[0] for s in ep) for ep in Recorded.log.values()),
               took_it=sum(any(near and not inv and act not in (None, "look") for near, act, inv, _ in ep)
                           for ep in Recorded.log.values()),
               agrees_with_expert=round(sum(exp is not None and act == exp for _, act, _, exp in steps) / len(steps), 3),
               invalid_per_step=round(sum(inv for _, _, inv, _ in steps) / len(steps), 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
