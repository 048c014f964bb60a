"""What a run saves and resumes from (StepPO, arXiv 2604.18401): checkpoints with torch.distributed.checkpoint (one
process or sharded, the same keys), their JSON meta, and the final model as a `save_pretrained` folder.

    save_checkpoint(cfg.out, it, parts, meta)     # <out>/ckpt-<it>/: every process its shards, rank 0 meta.json
    meta = load_checkpoint(cfg.out, parts)         # the newest readable one, into parts (in place)
    save_final(policy, tok, cfg.out)               # <out>/final/, what transformers and vLLM load, written whole

Nothing read from a checkpoint can run code (meta is JSON; a legacy meta.pt is read with weights_only=True).
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

from model import lora_scale, merged_weights, resolve, save_adapter
from scale import anywhere, sharded


def full_state_dict(model) -> dict:
    """The whole state dict on CPU: under FSDP2 gathered tensor by tensor, every process calls, rank 0 gets it (the
    others an empty dict); otherwise model.state_dict()."""
    if not sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model, tok, path, base=""):
    """A save_pretrained folder of the whole model (transformers and vLLM load it): under FSDP2 gathered tensor by
    tensor; every process calls, rank 0 writes. A model with LoRA adapters is saved merged (W + s B A), and its
    adapters beside it in peft's format under <path>/adapter/ (for the base model `base`)."""
    state = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(path, state_dict=dict(merged_weights(state.items(), lora_scale(model))))
        tok.save_pretrained(path)
        if lora_scale(model) is not None:
            save_adapter(model, state, os.path.join(path, "adapter"), base)


def save_final(model, tok, out, base=""):
    """<out>/final/, written whole or not at all: `save_pretrained` into <out>/final.tmp/, renamed when complete. A
    write that fails (a full disk) leaves the checkpoints as they are and stops the run with one line, non-zero."""
    master, final = not dist.is_initialized() or dist.get_rank() == 0, os.path.join(out, "final")
    tmp, error = final + ".tmp", None
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed write left
    try:
        save_pretrained(model, tok, tmp, base)
    except Exception as e:
        error = e
    if anywhere(error is not None):
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = (checkpoints(out) or ["none"])[-1]
        reason = f"{type(error).__name__}: {error}" if error else "another process failed to write"
        raise SystemExit(f"error: the final model was not written to {final} ({reason}); "
                         f"the newest checkpoint is kept ({newest}): make room and run again with --resume")
    if master:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if dist.is_initialized():
        dist.barrier()


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


def needed_bytes(parts: dict, checkpoints: bool = True) -> int:
    """What one checkpoint of `parts` and final/ (the policy, merged) take on disk, from the tensors' sizes: each
    model's saved weights (LoRA: the trained ones) and Adam's two fp32 moments per trained weight. checkpoints=False
    (--save-every 0): final/ only."""
    total = 0
    for model, opt in parts.values() if checkpoints else ():
        if model is not None:
            saved = [p for p in model.parameters() if opt is None or _trains_all(model) or p.requires_grad]
            total += sum(p.numel() * p.element_size() for p in saved)
            total += 8 * sum(p.numel() for p in model.parameters() if p.requires_grad) if opt is not None else 0
    return total + sum(p.numel() * p.element_size() for p in parts["policy"][0].parameters())


def _trains_all(model) -> bool:
    return all(p.requires_grad for p in model.parameters())


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
    if anywhere(error is not None):
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
    if not (isinstance(meta["iter"], int) and isinstance(meta["history"], list) and isinstance(meta["config"], dict)):
        raise ValueError("its meta file's iter, history or config is not an integer, a list and an object")
    return meta


# flags a resumed run may change: they alter neither what is trained nor how (docs/scaling.md, "Long runs"); --iters
# too where the iterations already trained had the learning rates the new --iters gives them (`check_resume`)
RESUMABLE = ("iters", "save_every", "eval_every", "log_groups", "report_to", "max_env_errors", "max_failures_in_a_row",
             "resume", "overwrite", "out")


def model_fingerprint(name_or_path: str) -> str:
    """Which base model a run trained (recorded in meta.json as base_model): a hash of a model folder's config.json and
    the first MiB of each weights file; a hub id's name where there is no local folder."""
    path = resolve(name_or_path)
    if not os.path.isdir(path):
        return f"name:{name_or_path}"
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            with open(os.path.join(path, name), "rb") as f:
                h.update(name.encode() + f.read(2**20))
    return h.hexdigest()[:16]


def check_resume(cfg, base_model: str, lr_factor):
    """--resume continues the run its newest readable checkpoint holds, with its flags: one line naming each flag that
    differs (old -> new) and is not RESUMABLE, or the base model when LoRA adapters would land on another one. A new
    --iters is refused where `lr_factor(cfg, it)` (the schedule) of an iteration already trained would differ: the
    resumed run is always the uninterrupted run with the new flags. Runs before any model loads (meta.json only)."""
    meta, done = None, checkpoints(cfg.out)
    if not done:
        raise SystemExit(f"error: --resume: no checkpoint (ckpt-<iter>/ folder) in {cfg.out}")
    for path in reversed(done):
        try:
            meta = read_meta(path)
            break
        except Exception:  # noqa: BLE001 (any unreadable meta)
            continue  # load_checkpoint says which and why
    if meta is None:
        raise SystemExit(f"error: --resume: no readable checkpoint in {cfg.out} (tried "
                         f"{', '.join(map(os.path.basename, done))})")
    saved, now = meta["config"], dataclasses.asdict(cfg)
    changed = [k for k in now if k in saved and k not in RESUMABLE and saved[k] != now[k]]
    old = dataclasses.replace(cfg, iters=saved.get("iters", cfg.iters))
    if any(lr_factor(old, it) != lr_factor(cfg, it) for it in range(meta["iter"] + 1)):
        changed.append("iters")  # the iterations already trained had another learning rate
    if changed:
        raise SystemExit("error: --resume with flags that change what is trained: " + "; ".join(
            f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in changed) +
            f" (may change: {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)}); start a new run for others")
    if cfg.lora_rank and meta.get("base_model") not in (None, base_model):
        raise SystemExit(f"error: --resume: the checkpoint's LoRA adapters were trained on another base model than "
                         f"--model {cfg.model!r} (fingerprint {meta['base_model']} -> {base_model})")


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
        if not anywhere(error is not None):
            return {**meta, "path": path}
        mismatch = re.search(r"size mismatch[^\n]*", str(error), re.IGNORECASE)
        if mismatch:  # whole, but of another shape: the flags say which model (check_resume)
            raise SystemExit(f"error: --resume: checkpoint {path} does not fit the model: {mismatch.group(0)[:300]}")
        if master:
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}" if error else "another process failed"
            print(f"warning: --resume: checkpoint {path} is unreadable or corrupt ({reason}); trying the one before",
                  file=sys.stderr)
    tried = ", ".join(map(os.path.basename, done))
    raise SystemExit(f"error: --resume: no readable checkpoint in {out} (tried {tried})")
