"""See the credit: one group of episodes from a run, every estimator's advantages, one picture (docs/method.md).

    python bench/credit_map.py runs/steppo                 # the run's policy and critic, one task of its train split
    python bench/credit_map.py runs/steppo --task 7 --split eval --out credit.png

Loads a run folder's newest checkpoint (policy, and critic if the run had one) and its config, plays a GRPO-sized
group of one task of the run's environment with the run's env kwargs (the first episode greedy, the others sampled
at the run's temperature; by default the first of tasks 0-3 whose group holds a win and a loss), computes on those
same trajectories the advantages of step_gae (with the run's critic), token_gae (the same critic read at every
action token), grpo, rloo, gigpo and
reinforce_pp_baseline through learner.compute_advantages (the trainer's own dispatch into credit.py), and draws a row
per estimator, a cell per step of each episode: the step's action (shortened), its reward, coloured by the
advantage the step's tokens get (token_gae: the mean, with the spread of its per-token advantages). The top row is
the critic's V(s_t) at each step boundary. Whitening and group statistics are over this group only. Beside the PNG,
a JSON holds every drawn number and what it was computed from (tests/test_docs.py recomputes them with credit.py).
"""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

ESTIMATORS_SHOWN = ("step_gae", "token_gae", "grpo", "rloo", "gigpo", "reinforce_pp_baseline")


def load_run(run_dir):
    """(config, policy, tokenizer, critic or None, checkpoint path) of a run folder, from its newest checkpoint."""
    import checkpoint
    import train
    from model import load_critic, load_policy
    ckpts = checkpoint.checkpoints(run_dir)
    if not ckpts:
        raise SystemExit(f"error: {run_dir} holds no checkpoint (ckpt-<iter>/): run train.py with --iters >= 1 first")
    meta_cfg = checkpoint.read_meta(ckpts[-1])["config"]
    cfg = train.Config(**{k: v for k, v in meta_cfg.items() if k in {f.name for f in dataclasses.fields(train.Config)}})
    policy, tok = load_policy(cfg.model)
    critic = load_critic(cfg.critic_model or cfg.model) if train.ESTIMATORS[cfg.estimator].critic else None
    checkpoint.load_checkpoint(run_dir, {"policy": (policy, None), "critic": (critic, None)})
    return cfg, policy.eval(), tok, critic, ckpts[-1]


def play_group(cfg, policy, tok, task, split, size):
    """`size` episodes of task seed `task`: the first greedy, the rest sampled at the run's temperature."""
    import envs
    from rollout import HFEngine, collect
    env_kwargs = json.loads(cfg.env_kwargs)
    env_list = [envs.make(cfg.env, split=split, **env_kwargs) for _ in range(size)]
    max_steps = cfg.max_steps or env_list[0].max_steps
    engine = HFEngine(policy, tok)
    greedy = collect(engine, env_list[:1], tok, [task], max_steps, cfg.max_new_tokens, 0.0, context=cfg.context, seed=task)
    sampled = collect(engine, env_list[1:], tok, [task] * (size - 1), max_steps, cfg.max_new_tokens, cfg.temperature,
                      context=cfg.context, seed=task + 1) if size > 1 else []
    return greedy + sampled


def credit_matrices(cfg, trajs, policy, critic, pad_id):
    """Per estimator: the advantage each step's tokens get (N, T), and for token_gae the min and max over the step's
    tokens; the critic's V(s_t) (N, T); the step mask (N, T). All through learner.no_grad_pass and learner.compute_advantages,
    i.e. credit.py's functions."""
    import learner
    import train
    dev = torch.device("cpu")
    out = {}
    for name in ESTIMATORS_SHOWN:
        c = dataclasses.replace(cfg, estimator=name, loss="")
        batches = learner.minibatches(c, trajs, pad_id, dev, torch.Generator().manual_seed(0))
        fwd = learner.no_grad_pass(c, policy, critic if train.ESTIMATORS[name].critic else None, None, batches, trajs,
                                 pad_id, dev)
        adv = learner.compute_advantages(c, trajs, batches, fwd["boot"], dev)  # V(s_t) from the no-grad pass, as in training
        out[name] = {"mean": adv["adv_step"]}
        if name == "token_gae":  # the spread of the per-token advantages inside each step
            tok, mask = adv["adv_tok"], torch.zeros_like(adv["adv_tok"])
            for i, tr in enumerate(trajs):
                for t, s in enumerate(tr.steps):
                    mask[i, t, :len(s.action_ids)] = 1
            real, inf = mask.sum(2) > 0, torch.tensor(float("inf"))
            out[name]["min"] = torch.where(real, torch.where(mask > 0, tok, inf).amin(2), torch.tensor(0.0))
            out[name]["max"] = torch.where(real, torch.where(mask > 0, tok, -inf).amax(2), torch.tensor(0.0))
            out["inputs"] = {"v_tok": adv["v_tok"], "token_mask": mask}  # what token_gae read (for the record)
        if name == "step_gae":
            out["V(s_t)"] = {"mean": adv["v_step"]}
    T = out["V(s_t)"]["mean"].shape[1]
    out["step_mask"] = {"mean": torch.tensor([[float(t < len(tr.steps)) for t in range(T)] for tr in trajs])}
    return out


def draw(trajs, matrices, title, path):
    """One row per matrix, a cell per step of each episode, annotated with the action, reward and number."""
    import textwrap
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    N, T = matrices["V(s_t)"]["mean"].shape
    names = ["V(s_t)", *ESTIMATORS_SHOWN]  # rows drawn (matrices also holds the step mask and token_gae's inputs)
    cell_w = max(1.1, min(2.2, 26 / max(T, 1)))
    fig, axes = plt.subplots(len(names), 1, figsize=(1.8 + cell_w * T, (0.42 * N + 0.55) * len(names) + 0.6),
                             squeeze=False)
    width = max(6, int(cell_w * 10))
    mask = matrices["step_mask"]["mean"].numpy()
    for ax, name in zip(axes[:, 0], names):
        m = matrices[name]["mean"].numpy()
        lim = max(float(abs(m[mask > 0]).max()) if mask.any() else 0.0, 1e-6)
        if name == "V(s_t)":  # values: a sequential scale; advantages: diverging around 0
            ax.imshow(m * mask, cmap="Greens", vmin=min(0.0, float(m[mask > 0].min())), vmax=lim, aspect="auto")
        else:
            ax.imshow(m * mask, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for i, tr in enumerate(trajs):
            for t, s in enumerate(tr.steps):
                text = s.action_text.strip().replace("<action>", "").replace("</action>", "")
                text = "".join(c if c.isprintable() else " " for c in text).replace("$", r"\$")  # no mathtext
                text = text[:width] + ("..." if len(text) > width else "")
                num = f"{m[i, t]:+.2f}"
                if "min" in matrices[name]:
                    num += f" [{matrices[name]['min'][i, t]:+.2f}, {matrices[name]['max'][i, t]:+.2f}]"
                dark = abs(m[i, t]) / lim > 0.6
                ax.text(t, i, f"{text}\nr={s.reward:g}  {num}", ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black")
        ax.set_yticks(range(N), [f"ep {i} {'greedy' if i == 0 else 'sampled'} {'WON' if tr.success else 'lost'}"
                                 for i, tr in enumerate(trajs)], fontsize=7)
        ax.set_xticks(range(T), [f"step {t}" for t in range(T)], fontsize=7)
        label = {"V(s_t)": "critic V(s_t) at each step boundary",
                 "token_gae": "token_gae (the same critic read before every action token): mean over the step's "
                              "tokens [min, max]"}.get(name, name)
        ax.set_title(label, fontsize=8, loc="left")
    fig.suptitle("\n".join(textwrap.wrap(title, 130)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def record(trajs, matrices, cfg, path):
    """Everything drawn, and what it was computed from, as JSON (lists of floats; (N, T) grids)."""
    tolist = lambda x: x.tolist() if torch.is_tensor(x) else x  # noqa: E731
    data = {"config": dataclasses.asdict(cfg),
            "episodes": [{"task_id": tr.task_id, "won": tr.success, "terminated": tr.terminated,
                          "rewards": [s.reward for s in tr.steps], "actions": [s.action_text for s in tr.steps],
                          "observations": [s.observation for s in tr.steps],
                          "action_tokens": [len(s.action_ids) for s in tr.steps]} for tr in trajs],
            "matrices": {k: {kk: tolist(vv) for kk, vv in v.items()} for k, v in matrices.items()}}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a train.py run folder (with ckpt-<iter>/)")
    p.add_argument("--task", type=int, default=None, help="task seed; default: the first of 0..3 with a mixed group")
    p.add_argument("--split", default="train", help="the env split to draw the task from (train: what RL trains on)")
    p.add_argument("--group-size", type=int, default=0, help="episodes in the group (default: the run's --group-size)")
    p.add_argument("--out", default=None, help="PNG path (default: <run_dir>/credit_map.png; the JSON beside it)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg, policy, tok, critic, ckpt = load_run(args.run_dir)
    size = args.group_size or max(cfg.group_size, 2)
    from model import pad_id
    candidates = [args.task] if args.task is not None else list(range(4))  # a few tries keep it under a minute
    for task in candidates:
        trajs = play_group(cfg, policy, tok, task, args.split, size)
        if len({t.success for t in trajs}) == 2:
            break
    else:
        task, trajs = candidates[0], play_group(cfg, policy, tok, candidates[0], args.split, size)
    matrices = credit_matrices(cfg, trajs, policy, critic, pad_id(tok))
    png = args.out or os.path.join(args.run_dir, "credit_map.png")
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    critic_note = f"critic from {os.path.basename(ckpt)}" if critic is not None else "no critic in this run: V = 0"
    title = (f"{os.path.basename(os.path.normpath(args.run_dir))}: {cfg.env} task {task} ({args.split}), {len(trajs)} episodes, gamma {cfg.gamma}, "
             f"lambda {cfg.lam}, {critic_note}; whitening and groups over these episodes")
    draw(trajs, matrices, title, png)
    record(trajs, matrices, cfg, os.path.splitext(png)[0] + ".json")
    print(f"wrote {png} and {os.path.splitext(png)[0]}.json (task {task}: "
          f"{sum(t.success for t in trajs)} of {len(trajs)} won)")
    return png


if __name__ == "__main__":
    main()
