"""Run by tests/test_scale.py under torchrun (2 CPU processes, gloo): one StepPO update of the tiny policy and critic
with FSDP2 (packed rows) and one with DDP (one row per step), then each with --remove-padding (DDP: packed rows),
micro-batches on, SGD, on `synthetic(rank)`.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR [--max-grad-norm X]

Writes OUT_DIR/<mode>-rank<r>.pt (advantages, pi_old and reference log-probs, micro-batch count) and OUT_DIR/<mode>-weights.pt
(rank 0: the full policy and critic state dicts after the update)."""
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from conftest import one_iteration  # noqa: E402
from step_mdp import Step, Trajectory  # noqa: E402

# per rank: trajectories as (first prompt length, [(action length, observation length), ...]); the ranks differ in
# rows, steps and lengths, so they split into different numbers of micro-batches
SHAPES = {0: [(10, [(5, 4), (3, 6), (7, 0)]), (6, [(4, 3), (6, 0)])],
          1: [(8, [(6, 5), (2, 0)]), (12, [(3, 2), (5, 3), (2, 2), (4, 0)]), (5, [(9, 0)])]}
ARGS = ["--minibatch-size", "8", "--micro-tokens", "30", "--kl-coef", "0.01", "--lr", "0.5", "--critic-lr", "0.5"]
MODES = {"fsdp": ["--fsdp"], "ddp": ["--no-pack"], "fsdp-unpadded": ["--fsdp", "--remove-padding"],
         "ddp-unpadded": ["--remove-padding"]}


def synthetic(rank: int) -> list[Trajectory]:
    """Packable multi-turn trajectories of random token ids (each prompt = the previous prompt + action + observation)."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = lambda n: torch.randint(5, 1000, (n,), generator=g).tolist()  # noqa: E731
    trajs = []
    for i, (p0, steps) in enumerate(SHAPES[rank]):
        prompt, out = ids(p0), []
        for a, o in steps:
            action = ids(a)
            out.append(Step(prompt, action, (-torch.rand(a, generator=g) * 3).tolist(), reward=float(torch.rand(1, generator=g))))
            prompt = prompt + action + ids(o)
        trajs.append(Trajectory(out, task_id=f"r{rank}-{i}", terminated=True))
    return trajs


def models(remove_padding=False):
    """The tiny policy, a critic with a random (seeded) value head so the backbone gets gradients, a reference copy;
    remove_padding: all three attend per row segment (unpad.use), as scale.load_models does under --remove-padding."""
    import unpad
    from model import load_critic, load_policy
    policy, tok = load_policy("tiny")
    critic = load_critic("tiny")
    with torch.no_grad():
        critic.head.weight.copy_(torch.randn(critic.head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    for m in (policy, critic, ref) if remove_padding else ():
        unpad.use(m)
    return policy.train(), critic, ref, tok


def main(out, extra):
    import checkpoint
    import scale
    import learner
    import train
    rank, world, device = scale.setup_distributed()
    for mode, flags in MODES.items():
        cfg = train.parse_config(ARGS + flags + extra)
        policy, critic, ref, tok = models(cfg.remove_padding)
        policy_w, critic_w = scale.prepare(policy, cfg, device), scale.prepare(critic, cfg, device)
        ref = scale.prepare(ref, cfg, device, train=False)
        opt_p, opt_c = torch.optim.SGD(policy.parameters(), lr=cfg.lr), torch.optim.SGD(critic.parameters(), lr=cfg.critic_lr)
        trajs, pad = synthetic(rank), tok.pad_token_id
        batches, lps, adv = one_iteration(cfg, policy, critic, ref, trajs, pad, device)
        st = learner.update(cfg, policy_w, critic_w, opt_p, opt_c, batches, device)
        from step_mdp import collate, split_rows
        n_micro = len(split_rows(collate(trajs, pad, pack=cfg.pack), cfg.micro_tokens))
        torch.save({"adv": adv, "lps": lps, "stats": st, "n_micro": n_micro}, os.path.join(out, f"{mode}-rank{rank}.pt"))
        weights = {"policy": checkpoint.full_state_dict(policy), "critic": checkpoint.full_state_dict(critic)}
        if rank == 0:
            torch.save(weights, os.path.join(out, f"{mode}-weights.pt"))
    torch.distributed.barrier()  # leave together (see the end of train.main)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
