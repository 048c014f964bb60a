"""Where the computation runs (StepPO, arXiv 2604.18401): processes, precision, sharding, loading and placing the
models, optimiser steps, checkpoints. Nothing here changes what is computed, only where, in which precision and in
how many pieces; with the default flags every function is a no-op or today's plain PyTorch call. What a run saves
and resumes from: checkpoint.py.

    rank, world, device = setup_distributed()            # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    policy, policy_ddp, critic, critic_ddp, ref, tok = load_models(cfg, device, "step")   # placed by prepare:
                                                         # --grad-ckpt, --dtype bf16 (a bf16 twin), --fsdp (FSDP2) or DDP;
                                                         # --compile: compile_layers
    for mb, real in even(split_rows(batch, cfg.micro_tokens), device): ...   # as many micro-batches on every process

Memory arithmetic and the commands for 1.5B / 7B models on 8 x 80 GB: docs/scaling.md.
"""
import contextlib
import copy
import ctypes
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Critic, add_adapters, load_critic, load_policy, load_tokenizer, resolve
import unpad

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


def keep_freed_memory() -> bool:
    """On the CPU with glibc: keep freed memory in the process for the next tensor instead of handing it back to the
    kernel. glibc serves a block above 32 MiB with a fresh mmap and unmaps it when freed, so every such tensor (an
    embedding gradient, a layer's activations) page-faults and zero-fills its pages again at every forward and
    backward: measured on SmolLM2-135M's update in docs/benchmarks.md. What jemalloc or tcmalloc preloaded do in
    PyTorch's CPU tuning guide, without a dependency. The process's resident memory stays at its peak. Returns
    whether it applied (False off glibc). Numbers computed are unchanged."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over processes (identity when not distributed)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def anywhere(flag: bool) -> bool:
    """True on every process if `flag` is True on any (so every process takes the same branch)."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return all_sum([float(flag)], device)[0] > 0


def teardown():
    """Leave the process group, every process together (after the engine is closed: vLLM tears down the groups it made
    inside ours first); a rank tearing gloo down while another still works can hang in its destructor."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


# ------------------------------------------------------------------------------------------ precision and sharding
def cpu_emulates_bf16(cfg, device) -> bool:
    """True for --dtype bf16 on a CPU with neither AVX-512 BF16 nor AMX: there a bf16 matrix product has no
    instructions of its own and is emulated (on a 2-core AMD EPYC with AVX2 only, by PyTorch's fallback: a square
    2048^3 product 0.2 GFLOP/s in bf16 against 82 in fp32, SmolLM2-135M's update 19x slower than in fp32), so train.py
    warns: the run is correct, only slower. docs/benchmarks.md, 'A CPU without bf16 instructions'."""
    has = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # noqa: E731  (private in torch 2.13)
    return (cfg.dtype == "bf16" and device.type == "cpu"
            and not has("_is_avx512_bf16_supported") and not has("_is_amx_tile_supported"))


def prepare(model, cfg, device, train=True):
    """Lay out `model` (policy, critic or reference) for this run; returns what the losses call (DDP's wrapper, or the
    model itself, or a bf16 twin). --grad-ckpt: non-reentrant activation checkpointing (trained models). --dtype bf16:
    bf16 compute over fp32 weights and Adam states (at lr 1e-6 bf16 weights would round the updates away): in one
    process a bf16 twin (`bf16_twin`), under --fsdp FSDP2's MixedPrecisionPolicy, under DDP or LoRA autocast. --fsdp: FSDP2 per decoder layer, then the root, on an explicit 1-D mesh; the critic's
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
        for m in decoder_layers(model):
            fully_shard(m, mesh=mesh, mp_policy=mp)
        if hasattr(model, "head"):  # Critic: head(h.float()) needs fp32 weights, not the root's bf16
            fully_shard(model.head, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
        # the root keeps its weights gathered from forward to backward; the reference has no backward: it reshards
        return fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=None if train else True)
    if dtype != torch.float32 and not dist.is_initialized() and not cfg.lora_rank:  # one process:
        return bf16_twin(model, dtype) if train else model  # a bf16 copy computes over fp32 masters; the reference
        # is stored in bf16 already and computes as the twin does (same kernels: KL 0 before the first step)
    if dtype != torch.float32:  # DDP and LoRA (and their reference): every forward under autocast; backward outside
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)
    return DDP(model) if train and dist.is_initialized() else model


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (inside the critic: of its backbone): the modules its
    `_no_split_modules` names, the units FSDP2 shards and --compile compiles."""
    hf = getattr(model, "backbone", model)
    return [m for m in model.modules() if type(m).__name__ in (hf._no_split_modules or ())]


def cast(model, dtype):
    """`model` with its parameters in `dtype` and its buffers as they were (rotary inv_freq stays fp32: rounded to bf16
    it would move every position's angle)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model = model.to(dtype)
    for n, b in buffers.items():
        model.get_buffer(n).data = b
    return model


def bf16_twin(model, dtype=torch.bfloat16):
    """--dtype bf16 in one process: a copy of `model` in bf16 that runs every forward and backward (the losses', the
    no-grad pass's, the HF engine's generate), so the matrix products run on the CPU's bf16 units (AMX, AVX-512 bf16)
    or a GPU's tensor cores without autocast re-casting the weights at every call. `model` keeps the fp32 master
    weights, which the optimiser steps and checkpoints hold: each of the twin's bf16 gradients is added, in fp32, to
    its master's .grad as soon as backward has accumulated it (micro-batches accumulate in fp32), then freed;
    `optimizer_step` steps the masters and copies them back (`refresh`). What FSDP2's MixedPrecisionPolicy does
    under --fsdp. The critic's value head stays fp32 (Critic.forward). Measured: docs/benchmarks.md."""
    twin = cast(copy.deepcopy(model), dtype)
    if hasattr(twin, "head"):
        twin.head.float()
    twin.masters = list(model.parameters())  # a plain list: not registered, not in the twin's state dict

    def to_master(master):
        def hook(t):
            g = t.grad.float()
            master.grad = g if master.grad is None else master.grad.add_(g)
            t.grad = None
        return hook
    for t, master in zip(twin.parameters(), twin.masters):
        if t.requires_grad:
            t.register_post_accumulate_grad_hook(to_master(master))
    return twin


@torch.no_grad()
def refresh(model):
    """A bf16 twin's weights := its masters' (after an optimiser step, a resume, a copy into the master); else a no-op."""
    for t, master in zip(model.parameters(), getattr(model, "masters", None) or ()) if model is not None else ():
        t.copy_(master)


def compile_layers(model):
    """--compile: each decoder layer of `model` runs its training and no-grad forwards (the update, the no-grad
    pass, the warm start: called without a KV cache) through torch.compile, which fuses the elementwise work around
    the matrix products (RMSNorm, rotary, SwiGLU, residuals; forward and backward) into generated kernels; a forward
    with a KV cache (generation) stays eager. The layers share one code object, so one compilation serves all of them
    (a few variants: grad on / off, train / eval mode; dynamic sequence lengths). Not bit-identical to eager (other
    fusion, other rounding). Measured on SmolLM2-135M: docs/benchmarks.md.
    Inductor's emulate_precision_casts: a fused kernel rounds each intermediate to bf16 where the eager op would, so
    the graph compiled with gradients (the update) and the one without (the no-grad pass) give the same bits whatever
    each kept in registers; without it, under --remove-padding they differed by bf16 roundings and StepPO's step clip
    (1 +- 3e-4) bound on most steps of the first minibatch, where the ratio must be exactly 1."""
    import torch._inductor.config as inductor_config
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # past it: eager
    inductor_config.emulate_precision_casts = True
    for layer in decoder_layers(model):
        eager, compiled = layer.forward, torch.compile(layer.forward, dynamic=True)

        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            return (_eager if kwargs.get("past_key_values") is not None else _compiled)(*args, **kwargs)
        layer.forward = forward


def unwrap(model):
    """The module that computes: DDP's inner module, else the model itself (a bf16 twin, an FSDP2 module)."""
    return model.module if isinstance(model, DDP) else model


def load_models(cfg, device, with_critic):
    """(policy, policy_ddp, critic, critic_ddp, ref, tokenizer) of --model / --critic-model, placed by --dtype and
    --fsdp (`prepare`). policy, critic: the modules (their weights, optimisers and checkpoints); *_ddp: what the
    losses call (the DDP wrapper, or the FSDP2 module itself). ref: the KL anchor, a frozen copy of the policy whose
    weights the caller sets after the warm start (None when --kl-coef is 0); critic None without one. --fsdp:
    `load_sharded` (one reader, shards only); else `load_full` (every process holds every model whole, as DDP does).
    --lora-rank > 0: the policy and the critic's backbone get LoRA adapters (`adapt`), only they (and the value head)
    train, and ref is the policy itself: the caller runs it inside model.adapters_off (the base model). --compile:
    the decoder layers of what computes (`compile_layers`). --remove-padding: what computes attends per row segment
    (`unpad.use`)."""
    policy, policy_ddp, critic, critic_ddp, ref, tok = (load_sharded if cfg.fsdp else load_full)(cfg, device, with_critic)
    for m in (m for m in (policy_ddp, critic_ddp, ref) if m is not None):  # what computes: the bf16 twins (or the models)
        if cfg.remove_padding:
            unpad.use(unwrap(m))
        if cfg.compile:
            compile_layers(unwrap(m))
    return policy, policy_ddp, critic, critic_ddp, ref, tok


def adapt(model, cfg):
    """--lora-rank > 0: `model` with LoRA adapters (model.add_adapters, every other weight frozen); else `model`."""
    try:
        return add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else model
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def load_full(cfg, device, with_critic):
    """load_models for DDP and one process: every process reads --model (and --critic-model) and keeps the policy,
    the critic and the reference (in --dtype) whole, then `prepare` places them (under --fsdp too: then it shards
    what every process has read, the path before load_sharded)."""
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
    ref = cast(copy.deepcopy(policy), DTYPES[cfg.dtype]) if cfg.kl_coef > 0 and not cfg.lora_rank else None
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
        if anywhere(error is not None):
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


def optimizer_step(opt, model, max_norm) -> float:
    """Clip the accumulated gradients and step, then clear them; returns the gradients' global L2 norm before the clip
    (`grad_norm` in metrics.jsonl). A step whose norm is not finite is skipped and the weights stay as they were.
    Under DDP/FSDP2 the gradients are reduced before the check (the norm is global), so every process makes the same
    decision. A bf16 twin: its fp32 masters are clipped and stepped, then copied to it.
    The clip is PyTorch's (gradients times max_norm / (norm + 1e-6)), applied only when that factor is below 1:
    multiplying by 1 changes no bit and would stream every gradient once more (the clip's multiplies took 0.8% of a
    SmolLM2 update in its profile)."""
    params = getattr(model, "masters", None) or list(model.parameters())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # FSDP2: a DTensor
    total = gather(norm)
    if torch.isfinite(total):
        if max_norm / (total + 1e-6) < 1:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        opt.step()
    opt.zero_grad(set_to_none=True)
    refresh(model)
    return total.item()


def adamw(params, lr, cfg):
    """AdamW without weight decay (the StepPO authors'). Under --dtype bf16 PyTorch's fused kernel (4x faster on a
    135M model on CPU, docs/benchmarks.md; not on FSDP2's sharded tensors); fp32 keeps the for-loop kernel, whose rounding the default run's numbers
    were measured with."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=(cfg.dtype != "fp32" and not cfg.fsdp) or None)


def no_sync(model, last: bool):
    """DDP: all-reduce the accumulated gradients only in the last micro-batch's backward. FSDP2 reduce-scatters after
    every micro-batch instead: skipping that would hold a whole unsharded fp32 gradient per process."""
    return model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (FSDP2 DTensor) one, a collective; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
