"""The learner: one iteration's trajectories in, updated weights out (and the supervised warm start, the lr schedule).

    batches = minibatches(cfg, trajs, pad_id, device, g)   # drawn and collated once: lists of Micro (micro-batches)
    fwd = no_grad_pass(cfg, policy, critic, ref, batches, trajs, pad_id, device)  # pi_old, reference, V(s_t)
    adv = compute_advantages(cfg, trajs, batches, fwd["boot"], device)        # credit by the ESTIMATORS entry
    factor = set_lr(cfg, it, opt_p, opt_c)                                   # --lr-warmup, --lr-schedule
    stats = update(cfg, policy_ddp, critic_ddp, opt_p, opt_c, batches, device)  # the --loss entry of LOSSES

Every phase works on the same micro-batches and leaves what it computed on them (`Micro.out`), so the update's
first forward is bit for bit the no-grad pass's (the ratio starts at exactly 1). train.py's loop calls these in this
order once per iteration (docs/method.md, equation by equation; docs/implementation-details.md).
"""
import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

import scale
from credit import ESTIMATORS, CreditInputs, explained_variance, group_index, whiten
from model import adapters_off, boundary_values, critic_outputs, step_logprobs
from scale import all_sum
from step_mdp import StepBatch, collate, split_rows, step_grids
from steppo_loss import LOSSES, kl_k3, step_ratios, truncated_is_weights, value_loss


# ------------------------------------------------------------------------------------------ one batching per iteration
@dataclass
class Micro:
    """One forward's worth of a minibatch, and what each phase of the iteration computed for its S steps."""
    b: StepBatch  # rows (B, L) and steps (S, A), on the device
    real: bool  # False: a repeat that only keeps FSDP2's collectives in step across processes (weight 0)
    gi: torch.Tensor  # (S,) each step's trajectory: its position in the iteration's list
    si: torch.Tensor  # (S,) each step's index in its trajectory
    w_step: float  # its share of the minibatch's steps with action tokens (0 when not real)
    w_tok: float  # ... of the minibatch's action tokens
    w_all: float  # ... of the minibatch's steps
    out: dict = dataclasses.field(default_factory=dict)  # no_grad_pass: old_lp (S, A), ref_lp (S, A), v_step (S,),
    # v_tok (S, A); compute_advantages: adv_step (S,), adv_tok (S, A), ret_step (S,), ret_tok (S, A)


def minibatches(cfg, trajs, pad_id, device, g) -> list[list[Micro]]:
    """The iteration's minibatches, drawn once (a permutation from `g`) and collated once: each a list of micro-batches
    of at most --micro-tokens padded tokens, as many on every process. The no-grad pass and the update forward exactly
    these rows, padding and micro-batches, so pi_old is bit for bit what the update computes before it moves the
    policy (the ratio starts at exactly 1); every epoch reuses them (as veRL's actor does)."""
    out = []
    for idx in torch.randperm(len(trajs), generator=g).split(cfg.minibatch_size):
        full = collate([trajs[i] for i in idx], pad_id, pack=cfg.pack)
        micro = []
        for mb, real in scale.even(split_rows(full, cfg.micro_tokens), device):
            shares = (real * n / max(total, 1) for n, total in zip(mb.counts(), full.counts()))
            micro.append(Micro(mb.to(device), real, idx[mb.traj_index], mb.step_index, *shares))
        out.append(micro)
    return out


# ------------------------------------------------------------------------------------------ before the update
@torch.no_grad()
def no_grad_pass(cfg, policy, critic, ref, batches, trajs, pad_id, device) -> dict:
    """What the update needs from the models before it changes them, over the update's own batching: per micro-batch
    one forward of the policy, the reference and the critic, kept on the micro-batch (`Micro.out`): "old_lp" (S, A),
    pi_old, the trainer's log-probs of every action token (recomputed, as PPO implementations and the StepPO authors
    do, so the ratio starts at exactly 1); "ref_lp" (S, A), the reference's (without one: absent); "v_step" (S,), the
    critic's V(s_t) at step boundaries; "v_tok" (S, A), V before every action token (zeros without a critic).
    Returns "boot" (N,): V at a cut episode's next state under --bootstrap (0: terminal), and "engine_kl": the k3
    estimate of KL(engine || trainer) per action token, from Step.engine_logprobs (docs/metrics.md)."""
    kl_sum, n_tok, at_actions = 0.0, 0.0, cfg.micro_tokens > 0
    for m in (m for mb in batches for m in mb):
        b = m.b
        lp = step_logprobs(policy, b, False, at_actions, cfg.remove_padding)[0].float()  # (S, A)
        m.out["old_lp"] = lp
        if ref is not None:
            with adapters_off(ref):  # --lora-rank: ref is the policy, run as its base model (else a no-op)
                m.out["ref_lp"] = step_logprobs(ref, b, False, at_actions, cfg.remove_padding)[0].float()
        if critic is not None:
            _, v_step, v_tok = critic_outputs(critic, b, cfg.remove_padding)  # (S,), (S, A)
            m.out["v_step"], m.out["v_tok"] = v_step.float(), v_tok.float()
        else:
            m.out["v_step"], m.out["v_tok"] = torch.zeros_like(lp[:, 0]), torch.zeros_like(lp)
        if m.real:
            n = b.action_step_mask.sum().item()
            kl_sum, n_tok = kl_sum + kl_k3(b.gather_steps(b.engine_logprobs), lp, b.action_step_mask).item() * n, n_tok + n
    kl_sum, n_tok = all_sum([kl_sum, n_tok], device)
    boot = torch.zeros(len(trajs))
    if critic is not None and cfg.bootstrap:  # V(s_T) where the critic is trained: the next state's step boundary
        limit = critic.backbone.config.max_position_embeddings
        cut = [i for i, t in enumerate(trajs) if not t.terminated and t.next_prompt_ids
               and len(t.next_prompt_ids) <= limit]  # a state beyond the context stays terminal
        chunks = [cut[i:i + cfg.minibatch_size] for i in range(0, len(cut), cfg.minibatch_size)] or [[]]
        for chunk, real in scale.even(chunks, device):  # as many forwards on every process (FSDP)
            v = boundary_values(critic, [trajs[i].next_prompt_ids for i in chunk] or [[pad_id]], pad_id, device)
            if real and chunk:
                boot[chunk] = v.float().cpu()
    return {"engine_kl": kl_sum / max(n_tok, 1), "boot": boot}


def as_grid(batches, key: str, shape) -> torch.Tensor:
    """The per-step tensors `key` of every real micro-batch, placed in a (N, T) or (N, T, A) grid of `shape` (zeros
    elsewhere): what credit reads, and what tests compare with a step-by-step loop."""
    grid = torch.zeros(shape)
    for m in (m for mb in batches for m in mb if m.real):
        x = m.out[key].cpu()
        if x.dim() == 1:
            grid[m.gi.cpu(), m.si.cpu()] = x
        else:
            grid[m.gi.cpu(), m.si.cpu(), :x.shape[1]] = x
    return grid


# ------------------------------------------------------------------------------------------ credit
def compute_advantages(cfg, trajs, batches, boot, device) -> dict:
    """Advantages for every step (N, T) and every action token (N, T, A), and the critic's targets, by the
    estimator's ESTIMATORS entry (docs/method.md), from the values `no_grad_pass` left on the micro-batches and `boot`;
    "--whiten" estimators are whitened over all processes' steps (or tokens). Each micro-batch gets its steps' share
    (`Micro.out`: adv_step, adv_tok, ret_step, ret_tok); returns the grids "adv_step", "adv_tok", "ret_step",
    "ret_tok" (zeros where the estimator has no critic of that kind), "v_step", "v_tok", and "explained_var" where
    it is defined."""
    est = ESTIMATORS[cfg.estimator]
    rewards, M, tok_mask = step_grids(trajs)  # (N, T), (N, T), (N, T, A)
    (N, T), A = M.shape, tok_mask.shape[2]
    out = {"v_step": as_grid(batches, "v_step", (N, T)), "v_tok": as_grid(batches, "v_tok", (N, T, A)),
           "ret_step": torch.zeros(N, T), "ret_tok": torch.zeros(N, T, A)}

    def procs_sum(t):  # whitening statistics over every process's batch under DDP (identity otherwise)
        return torch.tensor(all_sum(t.tolist(), device), dtype=t.dtype)

    states = torch.zeros(N, T, dtype=torch.long)  # GiGPO's anchor states: the observation each step acted on
    where = [(i, t) for i, traj in enumerate(trajs) for t in range(len(traj.steps))]
    states[tuple(torch.tensor(where).T)] = group_index(
        [(traj.task_id, traj.steps[t - 1].observation if t else "") for traj in trajs for t in range(len(traj.steps))])
    x = CreditInputs(rewards, M, out["v_step"], out["v_tok"], tok_mask, boot, group_index([t.task_id for t in trajs]),
                     states, cfg.gamma, cfg.lam, procs_sum)
    adv, returns = est.advantages(x)
    if est.whitening == "--whiten" and cfg.whiten:  # over steps (one entry per step), or over tokens for token_gae
        adv = whiten(adv, tok_mask if adv.dim() == 3 else M, all_sum=procs_sum)
    if adv.dim() == 3:  # per-token advantages; a per-step loss takes each step's mean
        out["adv_tok"], out["adv_step"] = adv, (adv * tok_mask).sum(2) / tok_mask.sum(2).clamp(min=1)
    else:  # per-step advantages, broadcast to the step's tokens
        out["adv_tok"], out["adv_step"] = adv[:, :, None] * tok_mask, adv
    if est.critic:  # the critic's targets, and is it learning? (explained variance: absent when every return is equal)
        key, mask = ("tok", tok_mask) if est.critic == "token" else ("step", M)
        out[f"ret_{key}"] = returns
        ev = explained_variance(out[f"v_{key}"], returns, mask)
        out.update({"explained_var": ev} if ev is not None else {})
    attach(batches, out, ("adv_step", "adv_tok", "ret_step", "ret_tok"), device)
    return out


def attach(batches, grids: dict, keys, device):
    """Each micro-batch gets its steps' entries of the (N, T) / (N, T, A) grids `keys` (`Micro.out`), gathered once."""
    for m in (m for mb in batches for m in mb):
        gi, si, a = m.gi.cpu(), m.si.cpu(), m.b.action_step_mask.shape[1]
        m.out.update({k: (grids[k][gi, si] if grids[k].dim() == 2 else grids[k][gi, si, :a]).to(device) for k in keys})


# ------------------------------------------------------------------------------------------ updates
def lr_factor(cfg, it: int) -> float:
    """Both learning rates' multiplier at iteration `it` (a function of `it` alone, so --resume continues exactly):
    a linear warm-up (it + 1) / (w + 1) over the first w = --lr-warmup iterations (nanoGPT's get_lr; a share of
    --iters when below 1), then --lr-schedule: 1 (constant), or from 1 down to --lr-floor at the last iteration,
    linearly (TRL's default) or along a half cosine (OpenRLHF's, veRL's option)."""
    w = round(cfg.lr_warmup * cfg.iters) if cfg.lr_warmup < 1 else int(cfg.lr_warmup)
    if it < w:
        return (it + 1) / (w + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    p = min(1.0, (it - w) / max(1, cfg.iters - 1 - w))  # 0 after the warm-up, 1 at the last iteration
    shape = 1 - p if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr_floor + (1 - cfg.lr_floor) * shape


def set_lr(cfg, it: int, opt_p, opt_c) -> float:
    """Both optimisers' learning rates for iteration `it` (--lr and --critic-lr times `lr_factor`); returns the factor."""
    factor = lr_factor(cfg, it)
    for opt, base in ((opt_p, cfg.lr), (opt_c, cfg.critic_lr)):
        for group in opt.param_groups if opt is not None else ():
            group["lr"] = base * factor
    return factor


def warm_start(cfg, policy, opt, demos, pad_id, device, g) -> float:
    """Supervised warm start: maximise the log-likelihood of the expert's action tokens (behaviour cloning)."""
    nll = float("nan")
    for _ in range(cfg.sft_steps):
        idx = torch.randint(len(demos), (cfg.sft_batch_size,), generator=g)
        full = collate([demos[i] for i in idx], pad_id, pack=cfg.pack)
        micro, nll = scale.even(split_rows(full, cfg.micro_tokens), device), 0.0
        for k, (mb, real) in enumerate(micro):
            b = mb.to(device)
            lp, _ = step_logprobs(policy, b, False, cfg.micro_tokens > 0, cfg.remove_padding)
            loss = -(lp * b.action_step_mask).sum() / full.action_step_mask.sum().clamp(min=1).to(device) * real
            with scale.no_sync(policy, last=k == len(micro) - 1):
                loss.backward()
            nll += loss.item()
        scale.optimizer_step(opt, policy, cfg.max_grad_norm)
    return nll


def update(cfg, policy, critic, opt_p, opt_c, batches, device, train_policy=True) -> dict:
    """`epochs` passes over this iteration's minibatches (the same ones every epoch); returns averaged diagnostics.
    Each micro-batch carries pi_old and the reference (no_grad_pass) and its advantages and value targets
    (compute_advantages). The policy loss is the --loss entry of LOSSES; each micro-batch's loss is weighted by its
    share of what the loss averages over (steps or tokens), so the accumulated gradient and every diagnostic are the
    whole minibatch's. Every statistic the loss returns is logged, and the mean gradient norm before the clip of the
    policy's and the critic's steps (grad_norm, critic_grad_norm; skipped steps left out). train_policy False
    (--critic-warmup): the critic alone is updated, the policy is not forwarded."""
    loss = LOSSES[cfg.loss]
    per_step, mean_over = loss.ratio == "step", loss.mean_over(cfg)
    stats, skipped, steps, tokens = defaultdict(list), 0, 0, 0
    steppers = ((opt_p, policy, "grad_norm"),) * train_policy + ((opt_c, critic, "critic_grad_norm"),) * (critic is not None)
    for epoch in range(cfg.epochs):
        for micro in batches:
            st = defaultdict(float)
            for k, m in enumerate(micro):
                b, last, mask = m.b, k == len(micro) - 1, m.b.action_step_mask  # mask (S, A)
                tokens += int(b.attention_mask.sum()) * m.real
                if not train_policy:  # --critic-warmup: the critic's loss only
                    critic_step(cfg, critic, m, last, st)
                    continue
                lp, ent = step_logprobs(policy, b, True, cfg.micro_tokens > 0, cfg.remove_padding)  # (S, A)
                old = m.out["old_lp"]  # the trainer's log-probs before this update (pi_old)
                if epoch == 0:  # the first pass's ratio per step and whether it was clipped (the episode file)
                    m.out["ratio"], m.out["clipped"] = step_ratios(lp, old, mask, per_step, loss.clip and loss.clip(cfg))
                eng = b.gather_steps(b.engine_logprobs)  # the engine's log-probs (S, A)
                w = truncated_is_weights(old, eng, mask, cfg.tis_cap, per_step) if cfg.tis_cap else None  # --tis-cap
                pl, s = loss.fn(lp, old, m.out["adv_step" if per_step else "adv_tok"], mask, w, cfg)
                w_pl = m.w_step if mean_over == "steps" else m.w_tok
                total = pl * w_pl
                if "ref_lp" in m.out:
                    kl = kl_k3(lp, m.out["ref_lp"], mask)
                    total = total + cfg.kl_coef * kl * m.w_tok
                    st["kl_ref"] += kl.item() * m.w_tok
                with scale.no_sync(policy, last):
                    total.backward()
                for key, v in {**s, "policy_loss": pl.item()}.items():  # clipfrac, approx_kl, ratio_mean, ...
                    st[key] += v * w_pl
                st["entropy"] += ent * m.w_tok
                critic_step(cfg, critic, m, last, st)
            for opt, model, key in steppers:
                norm = scale.optimizer_step(opt, model, cfg.max_grad_norm)  # before the clip; not finite: skipped
                ok = math.isfinite(norm)
                skipped, steps = skipped + (not ok), steps + 1
                if ok:
                    stats[key].append(norm)
            for key, v in st.items():
                stats[key].append(v)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out.setdefault("value_loss", 0.0)
    for _, _, key in steppers:
        out.setdefault(key, float("nan"))  # every step skipped (null in metrics.jsonl)
    return {**out, "skipped_updates": skipped, "optimizer_steps": steps, "train_tokens": tokens}


def critic_step(cfg, critic, m, last, st):
    """The clipped value loss of micro-batch `m`, backward into the critic (none without one): V(s_t) at step
    boundaries for a step critic, V before every action token for a token critic."""
    if critic is None:
        return
    _, v_step, v_tok = critic_outputs(critic, m.b, cfg.remove_padding)
    if ESTIMATORS[cfg.estimator].critic == "token":  # token-level critic targets
        vl, w_v = value_loss(v_tok, m.out["v_tok"], m.out["ret_tok"], m.b.action_step_mask, cfg.vf_clip), m.w_tok
    else:  # step-level critic: V(s_t) at step boundaries
        vl, w_v = value_loss(v_step, m.out["v_step"], m.out["ret_step"], torch.ones_like(v_step), cfg.vf_clip), m.w_all
    with scale.no_sync(critic, last):
        (vl * w_v).backward()
    st["value_loss"] += vl.item() * w_v
