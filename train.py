"""StepPO training loop (arXiv 2604.18401): warm start, multi-turn rollouts, step-level credit, clipped updates.

    python train.py                                        # tiny model, multihop, CPU, a few minutes
    python train.py --env alfworld --estimator grpo        # GRPO (its table entry pairs it with --loss token)
    torchrun --nproc_per_node 2 train.py                   # 2 CPU processes (gloo); DDP from the RANK variable
    python train.py --out runs/x --resume                  # continue the run in runs/x from its newest checkpoint

One iteration (`run`, numbered as the README's pseudocode): tasks -> rollouts -> one no-grad pass (`no_grad_pass`:
pi_old, reference, V at step boundaries) -> credit (`compute_advantages`, by the ESTIMATORS table) -> minibatch
updates (`update`) -> engine.sync. Equation by equation: docs/method.md; the details: docs/implementation-details.md;
every logged key: docs/metrics.md; GPUs (FSDP2, bf16, vLLM): docs/scaling.md and the plumbing in scale.py.
"""
import dataclasses
import json
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm import tqdm

import envs
import scale
from credit import ESTIMATORS, CreditInputs, estimator_table, explained_variance, group_index, whiten
from rollout import collect, eval_stats, finished_only, rollout_stats
from scale import all_sum
from step_mdp import collate, split_rows
from steppo_loss import (boundary_values, critic_outputs, kl_k3, step_logprobs, step_policy_loss, token_policy_loss, truncated_is_weights,
                         value_loss)


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
    fsdp: bool = False  # shard policy, critic and (bf16) reference with FSDP2 under torchrun, rank 0 reading --model; else DDP
    grad_ckpt: bool = False  # gradient (activation) checkpointing in the policy and the critic
    lora_rank: int = 0  # > 0: LoRA adapters of this rank train (policy; critic: + value head), base weights frozen; 0: off
    lora_alpha: float = 16.0  # LoRA's update is (alpha / rank) B A (verl's default alpha)
    lora_targets: str = "all-linear"  # Linear layers LoRA adapts: all-linear (all but the LM head) or names: q_proj,v_proj
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
    report_to: str = "none"  # none | tensorboard | wandb | tensorboard,wandb: metrics.jsonl's numbers there too

    def __post_init__(self):  # --loss not given: the loss the estimator pairs with (its ESTIMATORS entry)
        if not self.loss and self.estimator in ESTIMATORS:
            self.loss = ESTIMATORS[self.estimator].loss


def parse_config(argv=None) -> Config:
    """The command line, generated from Config: one flag per field, its comment as the help, its default shown."""
    return scale.parse_dataclass(Config, __doc__ + estimator_table(), check_config, argv)


def check_config(cfg: Config):
    """The reason `cfg` cannot run, or None."""
    choices = {"engine": ("hf", "vllm"), "estimator": tuple(ESTIMATORS), "loss": ("step", "token"), "context": ("full", "window"),
               "eval_split": ("eval", "valid", "train"), "dtype": tuple(scale.DTYPES), "vllm_sleep": (0, 1, 2)}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            return f"--{name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}, not {getattr(cfg, name)!r}"
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731 (finite floats: scale.parse_dataclass)
    for name in ("lr", "critic_lr", "sft_lr", "vf_clip", "max_grad_norm", "lora_alpha"):
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
           cfg.step_clip_high, cfg.clip_low, cfg.clip_high, cfg.kl_coef, cfg.tis_cap, cfg.lora_rank) < 0:
        return "--lora-rank, --iters, --sft-steps, --max-steps, --temperature, --micro-tokens, clip ranges, --kl-coef, --tis-cap >= 0"
    if cfg.dual_clip and cfg.dual_clip <= 1:
        return f"--dual-clip must be > 1 (or 0 to turn it off), not {cfg.dual_clip}"
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        return "--gamma and --lam must be in [0, 1]"
    if not 0 < cfg.vllm_memory < 1:
        return f"--vllm-memory is a fraction of the GPU's memory, in (0, 1), not {cfg.vllm_memory}"
    if problem := scale.missing_packages(cfg):  # vllm for --engine vllm, tensorboard / wandb for --report-to
        return problem
    return envs.check(cfg.env, cfg.env_kwargs, [cfg.eval_split, "train"])  # builds one env per split: fails now, not mid-run


# ------------------------------------------------------------------------------------------ before the update
@torch.no_grad()
def no_grad_pass(cfg, policy, critic, ref, trajs, pad_id, device) -> dict:
    """What the update needs from the models before it changes them, in one pass over the update's own batching
    (minibatches, packed rows, micro-batches): per micro-batch one forward of the policy, the reference, the critic.
    "old_lp" (N, T, A): pi_old, the trainer's log-probs of every action token, recomputed as PPO implementations (and
    the StepPO authors') do, so the ratio starts at exactly 1; "ref_lp" (N, T, A): the reference's (None without
    one); "v_step" (N, T): the critic's V(s_t) at step boundaries; "v_tok" (N, T, A): V before every action token
    (zeros without a critic); "boot" (N,): V at a cut episode's next state under --bootstrap (0: terminal);
    "engine_kl": the k3 estimate of KL(engine || trainer) per action token, from Step.engine_logprobs (docs/metrics.md)."""
    from model import adapters_off
    N, T, A = len(trajs), max(len(t.steps) for t in trajs), max(len(s.action_ids) for t in trajs for s in t.steps)
    out = {"old_lp": torch.zeros(N, T, A), "ref_lp": torch.zeros(N, T, A) if ref is not None else None,
           "v_step": torch.zeros(N, T), "v_tok": torch.zeros(N, T, A), "boot": torch.zeros(N)}
    kl_sum, n_tok, at_actions = 0.0, 0.0, cfg.micro_tokens > 0
    for idx in torch.arange(N).split(cfg.minibatch_size):
        full = collate([trajs[i] for i in idx], pad_id, pack=cfg.pack)
        for mb, real in scale.even(split_rows(full, cfg.micro_tokens), device):  # every process forwards (FSDP)
            b = mb.to(device)
            lp = step_logprobs(policy, b, False, at_actions)[0]  # (S, A')
            with adapters_off(ref):  # --lora-rank: ref is the policy, run as its base model (else a no-op)
                ref_lp = step_logprobs(ref, b, False, at_actions)[0] if ref is not None else None
            _, v_step, v_tok = critic_outputs(critic, b) if critic is not None else (None, None, None)  # (S,), (S, A')
            if not real:
                continue
            gi, si, mask, a = idx[b.traj_index.cpu()], b.step_index.cpu(), b.action_step_mask, lp.shape[1]
            out["old_lp"][gi, si, :a] = lp.float().cpu()
            if ref is not None:
                out["ref_lp"][gi, si, :a] = ref_lp.float().cpu()
            if critic is not None:
                out["v_step"][gi, si], out["v_tok"][gi, si, :a] = v_step.float().cpu(), v_tok.float().cpu()
            n = mask.sum().item()
            kl_sum, n_tok = kl_sum + kl_k3(b.gather_steps(b.engine_logprobs), lp, mask).item() * n, n_tok + n
    kl_sum, n_tok = all_sum([kl_sum, n_tok], device)
    out["engine_kl"] = kl_sum / max(n_tok, 1)
    if critic is not None and cfg.bootstrap:  # V(s_T) where the critic is trained: the next state's step boundary
        limit = critic.backbone.config.max_position_embeddings
        cut = [i for i, t in enumerate(trajs) if not t.terminated and t.next_prompt_ids
               and len(t.next_prompt_ids) <= limit]  # a state beyond the context stays terminal
        chunks = [cut[i:i + cfg.minibatch_size] for i in range(0, len(cut), cfg.minibatch_size)] or [[]]
        for chunk, real in scale.even(chunks, device):  # as many forwards on every process (FSDP)
            v = boundary_values(critic, [trajs[i].next_prompt_ids for i in chunk] or [[pad_id]], pad_id, device)
            if real and chunk:
                out["boot"][chunk] = v.float().cpu()
    return out


# ------------------------------------------------------------------------------------------ credit
def compute_advantages(cfg, trajs, fwd, device) -> dict:
    """Advantages for every step (N, T) and every action token (N, T, A), and the critic's targets, by the
    estimator's ESTIMATORS entry (docs/method.md), from the values of `no_grad_pass` (fwd: "v_step", "v_tok",
    "boot"); "--whiten" estimators are whitened over all processes' steps (or tokens). Returns "adv_step", "adv_tok",
    "ret_step", "ret_tok" (zeros where the estimator has no critic of that kind), "v_step" and "v_tok" (the
    rollout-time values the value loss clips around) and "explained_var" where it is defined."""
    est = ESTIMATORS[cfg.estimator]
    full = collate(trajs, pad_id=0)  # (N, T) grids and the step -> token layout of the whole batch (no ids used)
    (N, T), A, M = full.step_mask.shape, full.action_step_mask.shape[1], full.step_mask
    out = {"v_step": fwd["v_step"], "v_tok": fwd["v_tok"], "ret_step": torch.zeros(N, T), "ret_tok": torch.zeros(N, T, A)}
    tok_mask = torch.zeros(N, T, A)
    tok_mask[full.traj_index, full.step_index] = full.action_step_mask

    def procs_sum(t):  # whitening statistics over every process's batch under DDP (identity otherwise)
        return torch.tensor(all_sum(t.tolist(), device), dtype=t.dtype)

    states = torch.zeros(N, T, dtype=torch.long)  # GiGPO's anchor states: the observation each step acted on
    states[full.traj_index, full.step_index] = group_index(
        [(traj.task_id, traj.steps[t - 1].observation if t else "") for traj in trajs for t in range(len(traj.steps))])
    x = CreditInputs(full.rewards, M, fwd["v_step"], fwd["v_tok"], tok_mask, fwd["boot"],
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


def update(cfg, policy, critic, opt_p, opt_c, trajs, adv, fwd, pad_id, device, g) -> dict:
    """`epochs` passes of minibatch updates over this iteration's trajectories; returns averaged diagnostics.
    adv: from compute_advantages (advantages, value targets); fwd: from no_grad_pass (pi_old, the reference).
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
                old = fwd["old_lp"][gi, si, :A].to(device)  # the trainer's log-probs before this update (pi_old)
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
                if fwd["ref_lp"] is not None:
                    kl = kl_k3(lp, fwd["ref_lp"][gi, si, :A].to(device), mask)
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


# ------------------------------------------------------------------------------------------ main loop
def main(cfg: Config):
    """One run; SIGTERM and Ctrl-C end it after the iteration in progress, with a checkpoint (scale.Preemption)."""
    with scale.Preemption() as preempted:
        run(cfg, preempted)


def run(cfg: Config, preempted):
    rank, world, device = scale.setup_distributed()
    master = rank == 0
    from model import pad_id as get_pad_id  # transformers: after argument checks

    scale.seed_everything(cfg.seed * 1_000_003 + rank)
    # the models as --dtype / --fsdp place them; *_ddp: what the losses call; ref: the KL anchor (weights set below)
    policy, policy_ddp, critic, critic_ddp, ref, tok = scale.load_models(cfg, device, ESTIMATORS[cfg.estimator].critic)
    pad_id = get_pad_id(tok)
    opt_p = torch.optim.AdamW(scale.trained(policy), lr=cfg.lr, weight_decay=0.0)  # RL's; the warm start has its own
    opt_c = torch.optim.AdamW(scale.trained(critic), lr=cfg.critic_lr, weight_decay=0.0) if critic else None
    parts = {"policy": (policy, opt_p), "critic": (critic, opt_c), "ref": (ref if ref is not policy else None, None)}
    env_kwargs = json.loads(cfg.env_kwargs)
    train_envs = [envs.make(cfg.env, split="train", **env_kwargs) for _ in range(cfg.envs_per_iter)]
    eval_envs = [envs.make(cfg.env, split=cfg.eval_split, **env_kwargs)
                 for _ in range(min(cfg.eval_episodes, cfg.envs_per_iter))]
    max_steps = cfg.max_steps or train_envs[0].max_steps
    os.makedirs(cfg.out, exist_ok=True)
    tracker = scale.Tracker(cfg, enabled=master)  # rank 0: run.json (versions, machine, commit), metrics.jsonl, --report-to

    def rollouts(engine, env_list, seeds, temperature, sample_seed, expert=False):
        policy.eval()
        with scale.unsharded(policy, enabled=cfg.engine == "hf"):  # FSDP2: HF generate without collectives
            trajs = collect(engine, env_list, tok, seeds, max_steps, cfg.max_new_tokens, temperature,  # demos too
                            context=cfg.context, seed=sample_seed, expert=expert)
        policy.train()
        return trajs

    def log(row):  # rank 0: the history (checkpointed), metrics.jsonl and --report-to
        if master:
            history.append(row)
            tracker.log(row)

    def evaluate(engine) -> dict:  # an episode ended by an env error counts as a failure, and is counted
        return eval_stats(rollouts(engine, eval_envs, list(range(rank, cfg.eval_episodes, world)), 0.0, cfg.seed),
                          device)  # greedy; the episodes split by rank

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
            opt_sft = torch.optim.AdamW(scale.trained(policy), lr=cfg.sft_lr, weight_decay=0.0)  # RL starts afresh, as
            sft_loss = warm_start(cfg, policy_ddp, opt_sft, demos, pad_id, device, g)  # from a saved warm start
            if master:  # behaviour cloning of the expert as it plays, won or lost
                print(f"warm start: {cfg.sft_steps} steps on {len(demos)} expert episodes "
                      f"({sum(t.success for t in demos)} won), final NLL {sft_loss:.3f}")
            if critic is not None and not cfg.critic_model:  # the critic starts where the policy starts (the
                critic.backbone.load_state_dict(policy.base_model.state_dict())  # authors: from the actor's model)
        if ref is not None and ref is not policy:  # (LoRA: the anchor is the base model, --model)
            ref.load_state_dict(policy.state_dict())  # the KL anchor: the warm-started policy
    tracker.restart(history)  # metrics.jsonl holds exactly the iterations in the checkpoint's history
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
        clock = [time.time()]  # phase boundaries: rollout | no-grad pass | credit | update
        # 2. rollouts, token in token out: Trajectory -> Steps (prompt_ids, action_ids, engine_logprobs, reward)
        trajs, env_errors = finished_only(rollouts(engine, train_envs, seeds, cfg.temperature, rng.randrange(2**31)),
                                          cfg.max_env_errors, device, f"iteration {it}")  # an env that raised ends its episode only
        engine.sleep()  # --vllm-sleep: the update gets the engine's memory; sync wakes it
        clock.append(time.time())
        # 3. one no-grad pass: pi_old and the reference's log-probs, V(s_t) at step boundaries; engine_kl
        fwd = no_grad_pass(cfg, policy, critic, ref, trajs, pad_id, device)
        clock.append(time.time())
        # 4. credit: the estimator's advantages (step GAE), whitened over steps
        adv = compute_advantages(cfg, trajs, fwd, device)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it * 7_919 + rank)
        clock.append(time.time())
        # 5. minibatch updates: step-aligned clipped loss + k3 KL for the policy, clipped value loss for the critic
        st = update(cfg, policy_ddp, critic_ddp, opt_p, opt_c, trajs, adv, fwd, pad_id, device, g)
        clock.append(time.time())
        # 6. the new weights into the rollout engine
        engine.sync(policy)
        t_roll, t_fwd, t_credit, t_upd = (b - a for a, b in zip(clock, clock[1:]))

        gen_tokens = sum(len(s.action_ids) for t in trajs for s in t.steps)
        row.update(**rollout_stats(trajs, device), **{k: st[k] for k in ("policy_loss", "value_loss", "clipfrac",
                   "approx_kl", "entropy")}, engine_kl=fwd["engine_kl"], skipped_updates=st["skipped_updates"],
                   tokens_per_s=gen_tokens / max(t_roll, 1e-9), train_tokens_per_s=st["train_tokens"] / max(t_upd, 1e-9),
                   rollout_s=t_roll, forward_s=t_fwd, credit_s=t_credit, update_s=t_upd, wall_s=time.time() - t0,
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
            scale.shutdown(engine)
            raise SystemExit(preempted.exit_code)
    bar.close()

    scale.save_pretrained(policy, tok, os.path.join(cfg.out, "final"), cfg.model)  # loadable by transformers, vLLM
    if master:
        scale.plot_curve(cfg.out, history)
        tracker.close(os.path.join(cfg.out, "curve.png"))
        ev = [r["eval_success_rate"] for r in history if "eval_success_rate" in r]
        print(f"eval success rate: start {ev[0]:.2f} -> end {ev[-1]:.2f}; outputs in {cfg.out}/")
    scale.shutdown(engine)


if __name__ == "__main__":
    main(parse_config())
