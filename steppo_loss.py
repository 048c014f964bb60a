"""Objectives, tensor math only: the step-aligned clipped policy loss of StepPO, token-level PPO's loss, the critic
loss and KL, and the log-probs and entropies of logits they are computed from (the forward passes that produce the
logits and values are in model.py: `step_logprobs`, `critic_outputs`).

StepPO (arXiv 2604.18401, 'step-aligned policy optimization') gives each step ONE importance ratio, the
geometric mean of its token ratios, and clips it once: the unit that is rewarded is the unit that is clipped.
Applied to whole-trajectory rows the same function is GSPO (Zheng et al. 2025, arXiv 2507.18071).

Shapes: (B, L) = rows x tokens. The log-prob of input_ids[:, j] comes from the logits at position j - 1.
The equations, with a worked example: docs/method.md (equations 4-6).
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LOG_RATIO_LIMIT = 20.0  # |log r| is clamped here so exp never overflows into inf * 0 = NaN
KL_LIMIT = 10.0  # each k3 KL term is clamped to [-10, 10] (verl low_var_kl, used by the StepPO authors)


def _masked(x, mask):
    """x where mask is set, 0 elsewhere: NaN or inf in padding never leaks into real entries."""
    return torch.where(mask > 0, x, torch.zeros_like(x))


def _masked_mean(x, mask):
    """sum(mask * x) / sum(mask); entries outside the mask count as 0 even when they are NaN or inf."""
    return _masked(x * mask, mask).sum() / mask.sum().clamp(min=1)


def _chunks(B, L, V, chunk_tokens):
    """(row, column) slices tiling a (B, L) grid, each at most chunk_tokens positions (default: 2^24 / V, i.e.
    about 64 MiB of fp32 temporaries whatever the vocabulary)."""
    n = chunk_tokens or max(1, (1 << 24) // V)
    rows, cols = max(1, n // max(L, 1)), max(1, min(L, n))
    for i in range(0, B, rows):
        for j in range(0, L, cols):
            yield slice(i, i + rows), slice(j, j + cols)


def token_logprobs(logits, input_ids, chunk_tokens=None):
    """Per-token log-probs (B, L) from logits (B, L, V): column 0 is 0, column j = log_softmax(logits[:, j-1])[ids[:, j]].

    Computed as logit[target] - logsumexp(logits) in at least fp32, chunk by chunk, so temporaries stay at
    `chunk_tokens` x V floats and no second (B, L, V) tensor is materialised (bf16 logits under autograd are
    the exception: their fp32 chunks are kept for the backward pass).
    """
    B, L, V = logits.shape
    out = logits.new_zeros(B, L, dtype=torch.promote_types(logits.dtype, torch.float32))
    shifted, lg, tgt = out[:, 1:], logits[:, :-1], input_ids[:, 1:, None]  # views: token j from logits j - 1
    for r, c in _chunks(B, L - 1, V, chunk_tokens):
        x = lg[r, c].to(out.dtype)
        shifted[r, c] = x.gather(-1, tgt[r, c]).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return out


def gathered_logprobs(logits, targets, chunk_tokens=None):
    """log_softmax(logits)[targets] row by row: logits (K, V) at K chosen positions, targets (K,) -> (K,), in at least
    fp32 and chunked like token_logprobs. What the trainer uses: the LM head runs only where an action token is predicted."""
    K, V = logits.shape
    out = logits.new_zeros(K, dtype=torch.promote_types(logits.dtype, torch.float32))
    for _, c in _chunks(1, K, V, chunk_tokens):
        x = logits[c].to(out.dtype)
        out[c] = x.gather(-1, targets[c, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return out


@torch.no_grad()
def token_entropy(logits, chunk_tokens=None):
    """Entropy (B, L) of the next-token distribution at each position (a diagnostic; no gradient)."""
    B, L, V = logits.shape
    out = logits.new_zeros(B, L, dtype=torch.float32)
    for r, c in _chunks(B, L, V, chunk_tokens):
        lp = F.log_softmax(logits[r, c].float(), dim=-1)
        out[r, c] = -(lp.exp() * lp).sum(-1)
    return out


def _clipped_surrogate(log_r, A, weight, clip_low, clip_high, clip_c=None, is_weight=None):
    """PPO's pessimistic clipped surrogate for log-ratios `log_r` and advantages `A` (same shape), averaged with
    `weight`; also clipfrac and the k3 estimate of KL(old || new) (http://joschu.net/blog/kl-approx.html).
    clip_c: dual clip (Ye et al. 2020, arXiv 1912.09729): where A < 0 a term is at most clip_c * |A|.
    is_weight: a per-term factor (truncated importance weights between trainer and engine), no gradient.
    |log r| is clamped at LOG_RATIO_LIMIT (r <= 4.9e8) so the loss stays finite; beyond it a term has no gradient."""
    log_r = log_r.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = log_r.exp()
    A = A.to(log_r.dtype)
    terms = torch.max(-A * ratio, -A * ratio.clamp(1 - clip_low, 1 + clip_high))
    if clip_c is not None:
        terms = torch.where(A < 0, torch.min(terms, -A * clip_c), terms)
    if is_weight is not None:
        terms = terms * is_weight.to(terms.dtype)
    loss = _masked_mean(terms, weight)
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).to(log_r.dtype)
        stats = {"clipfrac": _masked_mean(clipped, weight).item(),
                 "approx_kl": _masked_mean((ratio - 1) - log_r, weight).item(),
                 "ratio_mean": _masked_mean(ratio, weight).item()}
        if clip_c is not None:
            stats["dual_clipfrac"] = _masked_mean(((A < 0) & (ratio > clip_c)).to(log_r.dtype), weight).item()
    return loss, stats


def step_policy_loss(logprobs, old_logprobs, advantages, action_mask, clip_low, clip_high, is_weight=None):
    """Step-aligned clipped objective (StepPO). logprobs, old_logprobs, action_mask (B, L); advantages (B,).

    Per row (one step): log r = sum(mask (lp - old)) / sum(mask), the geometric mean of the step's token
    ratios; l = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A). loss = mean of l over rows with at least
    one action token. The gradient reaches every token of the step through log r. is_weight (B,): optional
    per-step factor (truncated importance weight between trainer and engine).
    """
    mask = action_mask.to(logprobs.dtype)
    n_tok = mask.sum(-1)  # (B,)
    log_r = _masked(logprobs - old_logprobs, mask).sum(-1) / n_tok.clamp(min=1)  # geometric mean: one ratio per step
    return _clipped_surrogate(log_r, advantages, (n_tok > 0).to(logprobs.dtype), clip_low, clip_high,
                              is_weight=is_weight)


def token_policy_loss(logprobs, old_logprobs, advantages, action_mask, clip_low, clip_high, clip_c=None,
                      is_weight=None, seq_mean=False):
    """Token-level PPO clip (Schulman et al. 2017, Eq. 7), every (B, L): one ratio and one clip per token.

    loss = sum(mask * l) / sum(mask) with l = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), and with
    clip_c (dual clip) l = min(l, clip_c * |A|) where A < 0. is_weight (B, L): optional per-token factor.
    seq_mean=True: the mean of l over each row's tokens, then over rows with tokens (verl's
    "seq-mean-token-mean", what the StepPO authors run), so every step weighs the same whatever its length.
    """
    mask = action_mask.to(logprobs.dtype)
    weight = mask / mask.sum(-1, keepdim=True).clamp(min=1) if seq_mean else mask
    return _clipped_surrogate(_masked(logprobs - old_logprobs, mask), advantages, weight, clip_low, clip_high,
                              clip_c=clip_c, is_weight=is_weight)


def truncated_is_weights(old_logprobs, engine_logprobs, action_mask, cap, per_step):
    """Truncated importance sampling between the trainer and the rollout engine (TIS; as in verl's rollout
    correction): w = min(pi_trainer / pi_engine, cap) of the sampled tokens, (B, L), or per step (B,) from the
    geometric mean of the step's token ratios (per_step=True, matching the step ratio). No gradient."""
    mask = action_mask.to(old_logprobs.dtype)
    d = _masked(old_logprobs - engine_logprobs, mask).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if per_step:
        d = d.sum(-1) / mask.sum(-1).clamp(min=1)
    return d.exp().clamp(max=cap).detach()


def value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss (PPO as in CleanRL / OpenAI baselines): 0.5 * masked mean of
    max((v - R)^2, (old + clamp(v - old, -clip, clip) - R)^2). Any shape, all inputs alike.
    """
    mask = mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * _masked_mean(torch.max(unclipped, clipped), mask)


def kl_k3(logprobs, ref_logprobs, mask):
    """KL(pi || ref) by the k3 estimator (Schulman 2020; as in GRPO, Shao et al. 2024, Eq. 4):
    masked mean of exp(ref - lp) - (ref - lp) - 1, each term clamped to [-KL_LIMIT, KL_LIMIT] as verl's "low_var_kl"
    (the StepPO authors' KL loss). Non-negative for every token. As a loss its expected gradient is that of
    KL(ref || pi), not of the KL its value estimates (docs/method.md, equation 6)."""
    mask = mask.to(logprobs.dtype)
    d = _masked(ref_logprobs - logprobs, mask).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return _masked_mean((d.exp() - d - 1).clamp(-KL_LIMIT, KL_LIMIT), mask)


@torch.no_grad()
def step_ratios(logprobs, old_logprobs, action_mask, per_step, clip=None):
    """What a step's ratio did, for the episode log: (the step's geometric-mean ratio (B,), the share of its ratios
    outside [1 - low, 1 + high] (B,): 0 or 1 for a per-step ratio, a fraction of its tokens for per-token ones; zeros
    when `clip` is None). logprobs, old_logprobs, action_mask (B, L)."""
    mask = action_mask.to(logprobs.dtype)
    d = _masked(logprobs - old_logprobs, mask).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    n = mask.sum(-1).clamp(min=1)
    ratio = (d.sum(-1) / n).exp()
    if clip is None:
        return ratio, torch.zeros_like(ratio)
    out = lambda r: ((r < 1 - clip[0]) | (r > 1 + clip[1])).to(r.dtype)  # noqa: E731
    return ratio, out(ratio) if per_step else (out(d.exp()) * mask).sum(-1) / n


# ---------------------------------------------------------------- the loss table (train.py reads only this)
@dataclass(frozen=True, kw_only=True)
class Loss:
    """One row of the loss table: what the update needs to know about a policy loss. Built with keywords, checked when
    built: a typo fails at import, not silently at run time."""
    fn: Callable  # (logprobs (S, A), old_logprobs (S, A), advantages, action_mask (S, A), is_weight, cfg) -> (loss, stats)
    ratio: str  # "step": one importance ratio per step, advantages (S,), --tis-cap weights per step | "token": per token, (S, A)
    mean_over: Callable  # cfg -> "steps" | "tokens": what the loss averages over (how micro-batches are weighted)
    flags: tuple  # the Config fields fn reads (for --help and the docs)
    about: str  # one line for --help and the docs
    clip: Callable | None = None  # cfg -> (low, high): ratios outside [1 - low, 1 + high] are clipped (the episode log)

    def __post_init__(self):
        if self.ratio not in ("step", "token"):
            raise ValueError(f"Loss.ratio must be 'step' or 'token', not {self.ratio!r}")
        if not callable(self.fn) or not callable(self.mean_over):
            raise ValueError("Loss.fn and Loss.mean_over must be functions")


LOSSES = {  # adding a loss = its function above + one entry here (docs/extending.md)
    "step": Loss(fn=lambda lp, old, adv, mask, w, cfg: step_policy_loss(lp, old, adv, mask, cfg.step_clip_low,
                                                                      cfg.step_clip_high, is_weight=w),
                 ratio="step", mean_over=lambda cfg: "steps", flags=("step_clip_low", "step_clip_high"),
                 about="StepPO: one ratio per step (geometric mean of its tokens'), clipped per step",
                 clip=lambda cfg: (cfg.step_clip_low, cfg.step_clip_high)),
    "token": Loss(fn=lambda lp, old, adv, mask, w, cfg: token_policy_loss(lp, old, adv, mask, cfg.clip_low,
                                                                        cfg.clip_high, cfg.dual_clip or None,
                                                                        is_weight=w, seq_mean=cfg.seq_mean),
                  ratio="token", mean_over=lambda cfg: "steps" if cfg.seq_mean else "tokens",
                  flags=("clip_low", "clip_high", "dual_clip", "seq_mean"),
                  about="PPO: one ratio per token, clipped per token (dual clip; --seq-mean: per-step means)",
                  clip=lambda cfg: (cfg.clip_low, cfg.clip_high)),
}


def loss_table() -> str:
    """The table, as train.py --help prints it."""
    rows = [f"  {n:<8} ratio: {x.ratio:<6} flags: {', '.join('--' + f.replace('_', '-') for f in x.flags):<50} {x.about}"
            for n, x in LOSSES.items()]
    return "\nlosses (--loss; docs/method.md):\n" + "\n".join(rows) + "\n"
