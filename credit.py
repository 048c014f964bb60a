"""Credit assignment: returns and advantages at the step level, with the token- and trajectory-level baselines.

StepPO (arXiv 2604.18401, 'step-level credit assignment') runs GAE over turns: one time step = one whole response, the critic is
read at step boundaries, and advantages are whitened over steps. `token_gae` is token-level PPO's GAE (the
baseline the paper argues against); `grpo`, `rloo`, `gigpo`, `reinforce_pp` and `reinforce_pp_baseline` are
critic-free baselines. `ESTIMATORS` (at the end) is the table train.py reads: each estimator's function, whether it
needs a critic, groups by task, which loss it pairs with and how it is normalised. The equations: docs/method.md.

Shapes: (N, T) = trajectories x steps, left-aligned, `step_mask` 1 on real steps; (N, L) = trajectories x
tokens. Every function is vectorised over trajectories; the only Python loops run over time.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from steppo_loss import LOSSES


def _as_float(x):
    """Integer/bool inputs become float32, so advantages are never truncated to integers."""
    return x if x.is_floating_point() else x.float()


def _masked(x, mask):
    """x where mask is set, 0 elsewhere: NaN or inf in padding never leaks into real entries."""
    return torch.where(mask > 0, x, torch.zeros_like(x))


def group_index(keys: list) -> torch.Tensor:
    """(n,) ids: equal keys (a task id, an anchor state) get the same id, numbered in order of first appearance."""
    ids = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys])


def step_gae(rewards, values, step_mask, gamma, lam, bootstrap=None):
    """Step-level GAE (StepPO step-level credit assignment; GAE of Schulman et al. 2016 over turns). All inputs/outputs (N, T).

    For trajectory i with T_i steps: V(s_{T_i}) = bootstrap[i] (0 when None: the episode terminated),
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = delta_t + gamma lam A_{t+1}, A_{T_i} = 0; returns = A + V.
    Entries outside step_mask are 0 in both outputs.
    """
    rewards = _as_float(rewards)
    N, T = rewards.shape
    mask = step_mask.to(rewards.dtype)
    rewards, values = _masked(rewards, mask), _masked(values.to(rewards.dtype), mask)
    boot = rewards.new_zeros(N) if bootstrap is None else bootstrap.to(rewards)
    adv = torch.zeros_like(rewards)
    next_adv = rewards.new_zeros(N)
    next_value = boot.clone()  # used only at each trajectory's last real step
    for t in reversed(range(T)):
        m = mask[:, t]
        is_last = (m > 0) & ((mask[:, t + 1] == 0) if t + 1 < T else torch.ones_like(m, dtype=torch.bool))
        v_next = torch.where(is_last, boot, next_value)
        a_next = torch.where(is_last, torch.zeros_like(next_adv), next_adv)
        delta = rewards[:, t] + gamma * v_next - values[:, t]
        adv[:, t] = (delta + gamma * lam * a_next) * m
        next_adv, next_value = adv[:, t], values[:, t]
    returns = (adv + values) * mask
    return adv, returns


def whiten(x, mask, eps=1e-8, all_sum=None):
    """(x - mean) / (std + eps) over the entries where mask is 1 (unbiased std); 0 elsewhere.

    Step-level whitening (StepPO): one entry per step, never one per token. Fewer than 2 entries -> zeros.
    all_sum: a function summing a 1-D tensor over processes (train.py passes one under DDP), so the mean and
    std are those of the whole batch across processes, as if one process had collected it.
    """
    all_sum = all_sum or (lambda t: t)
    x = _as_float(x)
    mask = mask.to(x.dtype)
    x = _masked(x, mask)
    n, total = all_sum(torch.stack([mask.sum(), (x * mask).sum()]))
    if n < 2:
        return torch.zeros_like(x)
    mean = total / n
    var = all_sum((((x - mean) * mask) ** 2).sum()[None])[0] / (n - 1)
    return (x - mean) / (var.sqrt() + eps) * mask


def token_gae(token_rewards, token_values, token_mask, gamma, lam, bootstrap=None, per_token=False):
    """Token-level GAE of PPO for LLMs (the token-level MDP that StepPO argues against). All inputs/outputs (N, L).

    Only positions with mask 1 (action tokens) are time steps; the recursion skips mask-0 positions
    (environment tokens, padding) without advancing. After the last action token the next value is
    bootstrap[i] (0 when None). Outputs are 0 outside the mask.
    Discounting is per step by default: a step is a maximal run of consecutive mask-1 positions (one response;
    the environment's tokens separate responses), gamma and lam apply once where the recursion crosses from one
    step to the next (or to the bootstrap), and inside a step both are 1, so the token baseline sees the same
    horizon as `step_gae`. per_token=True applies gamma and lam at every action token (the classic variant).
    """
    token_rewards = _as_float(token_rewards)
    N, L = token_rewards.shape
    mask = token_mask.to(token_rewards.dtype)
    token_values = _masked(token_values.to(token_rewards.dtype), mask)
    # a token ends its step when the next position is not an action token (or the row ends)
    step_end = torch.cat([mask[:, 1:] == 0, torch.ones_like(mask[:, :1], dtype=torch.bool)], 1)
    adv = torch.zeros_like(token_rewards)
    next_adv = token_rewards.new_zeros(N)
    next_value = token_rewards.new_zeros(N) if bootstrap is None else bootstrap.to(token_rewards).clone()
    for t in reversed(range(L)):
        m = mask[:, t] > 0
        crossing = torch.ones_like(m) if per_token else step_end[:, t]
        g = torch.where(crossing, torch.full_like(next_value, gamma), torch.ones_like(next_value))
        gl = torch.where(crossing, torch.full_like(next_value, gamma * lam), torch.ones_like(next_value))
        delta = token_rewards[:, t] + g * next_value - token_values[:, t]
        a = delta + gl * next_adv
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
        next_adv = torch.where(m, a, next_adv)  # mask-0 positions carry the recursion through unchanged
        next_value = torch.where(m, token_values[:, t], next_value)
    returns = (adv + token_values) * mask
    return adv, returns


def token_gae_on_steps(rewards, token_values, token_mask, gamma, lam, bootstrap=None):
    """`token_gae` on the step grid the trainer keeps: rewards (N, T) per step, token_values and token_mask
    (N, T, A) per action token. Each step's reward sits on its last action token; a zero column after every step
    keeps consecutive steps apart, so gamma and lam apply once per step. Returns advantages and returns (N, T, A)."""
    N, T, A = token_mask.shape
    last = (token_mask.sum(2).long() - 1).clamp(min=0)  # (N, T) index of each step's last action token
    tok_r = torch.zeros(N, T, A + 1)
    tok_r.scatter_(2, last[..., None], _as_float(rewards)[..., None])
    pad = lambda x: torch.nn.functional.pad(x, (0, 1)).view(N, -1)  # noqa: E731  (N, T, A) -> (N, T (A + 1))
    adv, ret = token_gae(tok_r.view(N, -1), pad(token_values), pad(token_mask), gamma, lam, bootstrap)
    return adv.view(N, T, A + 1)[..., :A], ret.view(N, T, A + 1)[..., :A]


def _group_stats(x, group_ids):
    """Per-element group size, group mean and unbiased group variance (0 for groups of one). All (N,)."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1
    count = x.new_zeros(G).index_add_(0, inv, torch.ones_like(x))
    total = x.new_zeros(G).index_add_(0, inv, x)
    mean = total / count
    sq = x.new_zeros(G).index_add_(0, inv, (x - mean[inv]) ** 2)
    var = sq / (count - 1).clamp(min=1)
    return count[inv], mean[inv], var[inv]


def grpo(scores, group_ids, std_normalize=True, eps=1e-6):
    """GRPO outcome advantage (DeepSeekMath, Shao et al. 2024, Sec. 4.1.2). (N,) -> (N,).

    (s - group mean) / (unbiased group std + eps).
    With std_normalize=False: s - group mean (Dr. GRPO). A group of one gets 0.
    """
    scores = _as_float(scores)
    count, mean, var = _group_stats(scores, group_ids)
    adv = scores - mean
    if std_normalize:
        adv = adv / (var.sqrt() + eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv))


def rloo(scores, group_ids):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): s_i minus the mean of the others in its group. (N,).

    A group of one gets 0.
    """
    scores = _as_float(scores)
    count, mean, _ = _group_stats(scores, group_ids)
    others = (mean * count - scores) / (count - 1).clamp(min=1)
    return torch.where(count > 1, scores - others, torch.zeros_like(scores))


def reinforce_pp(rewards, step_mask, gamma, all_sum=None):
    """REINFORCE++ (Hu 2025, arXiv 2501.03262, Sec. 3): no critic, no group; the discounted reward-to-go
    G_t = sum_{k >= t} gamma^(k - t) r_k of every step, normalised over the whole batch (global batch
    normalisation, here over steps: `whiten`). All (N, T); 0 outside step_mask. all_sum: see `whiten`."""
    rewards = _as_float(rewards)
    mask = step_mask.to(rewards.dtype)
    r = _masked(rewards, mask)
    G = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        G[:, t] = running
    return whiten(G, mask, all_sum=all_sum)


def reinforce_pp_baseline(rewards, step_mask, group_ids, all_sum=None):
    """REINFORCE++-baseline (Hu 2025, arXiv 2501.03262): each trajectory's total reward minus the mean total
    reward of its group (the trajectories of the same task, itself included; a group of one gets 0), broadcast
    to its steps, then normalised over the whole batch of steps (`whiten`). rewards, step_mask (N, T);
    group_ids (N,). Returns (N, T), 0 outside step_mask."""
    rewards = _as_float(rewards)
    mask = step_mask.to(rewards.dtype)
    score = _masked(rewards, mask).sum(1)  # (N,)
    _, mean, _ = _group_stats(score, group_ids)
    return whiten((score - mean)[:, None] * mask, mask, all_sum=all_sum)


def gigpo(rewards, step_mask, group_ids, state_ids, gamma, step_weight=1.0, eps=1e-6):
    """GiGPO (Feng et al. 2025, arXiv 2505.10978, Sec. 4): episode + step-level relative advantages. (N, T).

    Episode part: `grpo` of each trajectory's undiscounted total reward, broadcast to its steps.
    Step part: discounted reward-to-go G_t, normalised as (G - mean) / (unbiased std + eps) within each anchor
    group = the valid steps sharing (group_id, state_id); an anchor group of one gets 0.
    Result = episode + step_weight * step, 0 outside step_mask.
    """
    rewards = _as_float(rewards)
    mask = step_mask.to(rewards.dtype)
    r = _masked(rewards, mask)
    episode = grpo(r.sum(1), group_ids, eps=eps)[:, None].expand_as(r)
    G = torch.zeros_like(r)  # discounted reward-to-go, (N, T)
    running = r.new_zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        G[:, t] = running
    valid = mask.reshape(-1) > 0
    if not valid.any():
        return torch.zeros_like(r)
    _, group = torch.unique(group_ids, return_inverse=True)
    _, state = torch.unique(state_ids.reshape(-1)[valid], return_inverse=True)  # compact state ids
    key = group[:, None].expand_as(state_ids).reshape(-1)[valid] * (int(state.max()) + 1) + state
    _, anchor = torch.unique(key, return_inverse=True)  # one id per (group, state) anchor
    step = torch.zeros_like(G).reshape(-1)
    step[valid] = grpo(G.reshape(-1)[valid], anchor, eps=eps)
    return (episode + step_weight * step.reshape(G.shape)) * mask


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over the entries where mask is 1 (a diagnostic of the critic, as in
    CleanRL's PPO: 1 is a perfect critic, 0 is no better than a constant, < 0 is worse); None when Var(returns) = 0."""
    mask = mask.to(returns.dtype)
    n = mask.sum()
    var = lambda x: (_masked((x - _masked(x, mask).sum() / n) ** 2, mask)).sum() / n  # noqa: E731
    v_ret = var(returns)
    return None if n < 1 or v_ret <= 1e-12 else (1 - var(returns - values) / v_ret).item()


# ------------------------------------------------------------------------------------------ the estimator table
@dataclass
class CreditInputs:
    """What an estimator may read: (N, T) = trajectories x steps, (N, T, A) = ... x action tokens."""
    rewards: torch.Tensor  # (N, T) r_t, 0 outside step_mask
    step_mask: torch.Tensor  # (N, T) 1 on real steps
    v_step: torch.Tensor  # (N, T) V(s_t) at step boundaries (0 without a critic)
    v_tok: torch.Tensor  # (N, T, A) V before each action token (0 without a critic)
    token_mask: torch.Tensor  # (N, T, A) 1 on real action tokens
    bootstrap: torch.Tensor  # (N,) V(s_T) of a cut episode under --bootstrap, else 0
    groups: torch.Tensor  # (N,) task group ids (trajectories of one task share one)
    states: torch.Tensor  # (N, T) GiGPO anchor-state ids: the observation a step acted on, within its task group
    gamma: float
    lam: float
    all_sum: object  # sums a 1-D tensor over processes (whitening statistics of the whole batch)


CRITICS = ("step", "token", "")  # V(s_t) trained at step boundaries | V at every action token | no critic
WHITENINGS = ("--whiten", "always", "group", "none")


@dataclass(frozen=True, kw_only=True)
class Estimator:
    """One row of the estimator table: everything the loop needs to know about an advantage estimator. Built with
    keywords, checked when built: a typo in a field fails at import, not silently at run time."""
    advantages: Callable  # CreditInputs -> (advantages (N, T) per step or (N, T, A) per token, returns or None)
    critic: str  # "step": V(s_t) trained at step boundaries | "token": V at every action token | "": no critic
    grouped: bool  # compares the trajectories of one task: needs --group-size >= 2
    loss: str  # the loss (steppo_loss.LOSSES) it runs with when --loss is not given (the authors' scripts' pairing)
    whitening: str  # "--whiten": whitened over the batch when --whiten (steps; tokens for token advantages) |
    #                 "always": by definition, inside its function above | "group": its own group-std | "none"
    about: str  # one line for --help and the docs

    def __post_init__(self):
        for name, allowed in (("critic", CRITICS), ("whitening", WHITENINGS), ("loss", tuple(LOSSES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Estimator.{name} must be one of {allowed}, not {getattr(self, name)!r}")


ESTIMATORS = {  # adding an estimator = its function above + one entry here (train.py reads only this; docs/extending.md)
    "step_gae": Estimator(advantages=lambda x: step_gae(x.rewards, x.v_step, x.step_mask, x.gamma, x.lam, x.bootstrap),
                          critic="step", grouped=False, loss="step", whitening="--whiten",
                          about="StepPO: GAE over steps, V read at step boundaries"),
    "token_gae": Estimator(advantages=lambda x: token_gae_on_steps(x.rewards, x.v_tok, x.token_mask, x.gamma, x.lam,
                                                                   x.bootstrap),
                           critic="token", grouped=False, loss="token", whitening="--whiten",
                           about="PPO: GAE over action tokens, gamma once per step"),
    "grpo": Estimator(advantages=lambda x: (grpo(x.rewards.sum(1), x.groups)[:, None] * x.step_mask, None),
                      critic="", grouped=True, loss="token", whitening="group",
                      about="GRPO: (score - group mean) / group std, broadcast"),
    "rloo": Estimator(advantages=lambda x: (rloo(x.rewards.sum(1), x.groups)[:, None] * x.step_mask, None),
                      critic="", grouped=True, loss="token", whitening="none",
                      about="RLOO: score - mean of the others in its group, broadcast"),
    "gigpo": Estimator(advantages=lambda x: (gigpo(x.rewards, x.step_mask, x.groups, x.states, x.gamma), None),
                       critic="", grouped=True, loss="token", whitening="group",
                       about="GiGPO: episode group + anchor-state group"),
    "reinforce_pp": Estimator(advantages=lambda x: (reinforce_pp(x.rewards, x.step_mask, x.gamma, x.all_sum), None),
                              critic="", grouped=False, loss="token", whitening="always",
                              about="REINFORCE++: reward-to-go, whitened over steps"),
    "reinforce_pp_baseline": Estimator(
        advantages=lambda x: (reinforce_pp_baseline(x.rewards, x.step_mask, x.groups, x.all_sum), None),
        critic="", grouped=True, loss="token", whitening="always",
        about="REINFORCE++-baseline: score - group mean, whitened over steps"),
}


def estimator_table() -> str:
    """The table, as train.py --help prints it."""
    rows = [f"  {n:<22} critic: {e.critic or '-':<6} grouped: {'yes' if e.grouped else 'no ':<4} loss: {e.loss:<6} "
            f"whitening: {e.whitening:<9} {e.about}" for n, e in ESTIMATORS.items()]
    return "\nestimators (--estimator; docs/method.md):\n" + "\n".join(rows) + "\n"
