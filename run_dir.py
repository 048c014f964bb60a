"""A run folder (`--out`) belongs to one run (docs/scaling.md, "Long runs").

    claim(cfg, master, device)   # before any model loads: --out writable, locked by this job, no other run's files
    release(cfg.out)             # at the end (train.main's finally): the lock goes, if it is this process's
    check_room(cfg.out, need)    # free space for one more checkpoint and final/, or one line

The lock is <out>/run.lock, JSON {"pid", "host", "start"}: written by rank 0 of a job (all processes of one torchrun are
one job), created exclusively so two jobs cannot both take it. A lock whose process is gone (same host, no such pid, or
a pid reused by a process started later) is stale and taken over; one from another host is obeyed (this host cannot
tell whether it lives): delete it by hand. A new run (no --resume) into a folder that holds another run's files stops
with one line unless --overwrite, which deletes those files (and only those: RUN_FILES) first.
"""
import json
import os
import re
import shutil
import socket
import time

from scale import anywhere

LOCK = "run.lock"
RUN_FILES = re.compile(r"(ckpt-\d+(\.tmp)?|final(\.tmp)?|metrics\.jsonl|episodes\.jsonl|run\.json|report\.html|"
                       r"curve\.png|tensorboard|wandb|engine_init)$")  # what train.py writes into --out
RAN = re.compile(r"(ckpt-\d+|final|metrics\.jsonl|episodes\.jsonl)$")  # a run that got to its first evaluation: another
# run's. A start stopped before (run.json alone) is not: the same command simply starts again (a new run.json)


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since boot, from /proc), None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _alive(lock: dict) -> bool:
    """Whether the process a lock names still runs (True for another host's: it cannot be checked from here)."""
    if lock.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(lock["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    started = _started(int(lock["pid"]))
    return started is None or lock.get("start") is None or abs(started - lock["start"]) < 1  # not a reused pid


def _take_lock(out) -> str | None:
    """Create <out>/run.lock for this process; why not, or None."""
    path = os.path.join(out, LOCK)
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _started(os.getpid()),
                       "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(2):  # a stale lock is removed once, then taken like a free one
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    held = json.load(f)
            except (OSError, ValueError):
                held = {}  # unreadable (a crash while writing it): stale
            if isinstance(held, dict) and held and _alive(held):
                return (f"another job (pid {held.get('pid')} on {held.get('host')}, since {held.get('time')}) is "
                        f"running in {out}: wait for it, stop it, or choose another --out (a lock from another host "
                        f"is obeyed: delete {path} if that job is gone)")
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return None
    return f"could not take the lock {path}"


def _others_files(out) -> list[str]:
    """The files of another run in `out` (RUN_FILES, where any file says that run got somewhere: RAN), sorted."""
    names = sorted(os.listdir(out))
    return [n for n in names if RUN_FILES.match(n)] if any(RAN.match(n) for n in names) else []


def claim(cfg, master: bool, device):
    """Make --out this job's, before any model loads; every process stops together with one line when it cannot be:
    --out not a writable folder, another live job's lock, another run's files without --resume or --overwrite."""
    problem = None
    if master:
        try:
            os.makedirs(cfg.out, exist_ok=True)
            probe = os.path.join(cfg.out, f".write-test-{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            problem = f"--out {cfg.out} is not a folder this job can write ({type(e).__name__}: {e.strerror or e})"
        problem = problem or _take_lock(cfg.out)
        found = [] if problem or cfg.resume else _others_files(cfg.out)
        if found and not cfg.overwrite:
            release(cfg.out)
            listed = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
            problem = (f"--out {cfg.out} holds another run ({listed}): continue it with --resume, start over with "
                       f"--overwrite (deletes those files), or choose another --out")
        elif found:  # --overwrite: the old run's files go, nothing else in the folder is touched
            for name in found:
                path = os.path.join(cfg.out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            print(f"--overwrite: deleted {len(found)} files of the previous run in {cfg.out}")
    if anywhere(problem is not None):
        raise SystemExit(f"error: {problem}" if problem else 1)


def release(out):
    """Remove <out>/run.lock if this process holds it (a no-op for other processes and other jobs' locks)."""
    path = os.path.join(out, LOCK)
    try:
        with open(path) as f:
            held = json.load(f)
        if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
            os.remove(path)
    except (OSError, ValueError, AttributeError):
        pass


def check_room(out, need: int, master: bool, what: str = "a checkpoint and final/ need"):
    """Stop with one line when the filesystem of `out` has less than `need` bytes free (all processes together)."""
    free = shutil.disk_usage(out).free if master else need
    if anywhere(free < need):
        raise SystemExit(f"error: {out} has {free / 2**20:.0f} MiB free; {what} "
                         f"{need / 2**20:.0f} MiB: make room or choose another --out" if master else 1)
