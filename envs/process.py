"""An environment in its own process, so a call that hangs can be ended (`--env-timeout`, docs/scaling.md).

    env = EnvProcess("alfworld", {"split": "train"}, timeout=600)  # envs.make(...) in a child process
    pool = make_envs("alfworld", {"split": "train"}, 32, timeout=600)  # started in parallel (timeout 0: in-process)
    obs, info = env.reset(seed)          # the protocol of envs/__init__.py, unchanged
    env.send("step", text); env.recv()   # or in two halves: rollout.collect sends every live episode's step,
                                         # then collects the answers, so the envs step in parallel

A reset or step that does not answer in `timeout` seconds (a hang in Python code or in a C extension alike), or a
child that dies (a segfault, os._exit), raises `EnvTimeout` / `EnvDied` in the caller, where it ends that episode as
any env error does; the child is killed and a fresh one started with the same arguments, so the next episode gets a
working env. An exception in the child (SystemExit included) comes back as `EnvRaised` with the child's traceback.
Children are forked (Linux; spawned elsewhere), in their own session (a signal to the caller's process group does not
reach them: the caller decides when they end, `close_all`); the caller's sys.path is passed on, so plugins import as
they would in-process.
"""
import multiprocessing as mp
import os
import signal
import stat
import sys
import time
import traceback

import envs


class EnvTimeout(Exception):
    """A reset or step that did not answer in time: the env's process was replaced."""


class EnvDied(Exception):
    """The env's process ended without answering (a crash in native code, os._exit): it was replaced."""


class EnvRaised(Exception):
    """An exception raised by the env in its process; the message is the child's traceback."""


class StopWaiting(BaseException):
    """The run must stop now (a signal came, and the env being waited for has not answered): not an env error, so no
    `except Exception` in the rollout catches it; train.main turns it into the signal's exit code."""


stop_requested = None  # train.main sets it: a callable, True when the run must stop instead of waiting on an env


def _close_inherited_sockets(keep: int):
    """A forked child holds copies of its parent's sockets (torch.distributed's connections, its TCP store): closed
    here, so a peer sees the parent leave when it leaves (else a 2-process job waits forever for a gone rank)."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        try:
            if fd > 2 and fd != keep and stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass


def _serve(conn, name, kwargs, path):
    """The child: build the env, send its protocol attributes, then answer (method, args) calls until None. It leaves
    the signals to its parent (a scheduler's SIGTERM to the process group, Ctrl-C in a terminal): the parent ends it."""
    if hasattr(os, "setsid"):
        os.setsid()  # out of the parent's process group: torchrun's killpg and a terminal's Ctrl-C do not reach it
    _close_inherited_sockets(keep=conn.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (spawned children stay in the group: Ctrl-C is the parent's)
    sys.path[:] = path
    try:
        env = envs.make(name, **kwargs)
        conn.send((True, {"class": type(env).__name__, **{k: getattr(env, k, None) for k in ("system_prompt",
                                                                                               "max_steps", "tools")}}))
    except BaseException:  # noqa: BLE001 (SystemExit in a constructor too)
        conn.send((False, traceback.format_exc()))
        return
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):  # the caller is gone (or Ctrl-C reached the whole group)
            return
        if call is None:
            return
        method, args = call
        try:
            out = getattr(env, method)(*args)
        except BaseException:  # noqa: BLE001 (SystemExit from env code is the env's error, not the child's end)
            conn.send((False, traceback.format_exc()))
            continue
        try:
            conn.send((True, out))
        except Exception:  # noqa: BLE001 (a value that does not pickle)
            conn.send((False, traceback.format_exc()))


def _context():
    """fork where the platform has it (Linux: a start costs milliseconds, the env's module is already imported), as
    gym's AsyncVectorEnv does; else spawn. The child runs env code only (no torch, no CUDA)."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


LIVE = set()  # this process's EnvProcesses (held until closed): `close_all` ends their children


def make_envs(name: str, kwargs: dict, n: int, timeout: float) -> list:
    """`n` envs `envs.make(name, **kwargs)`: each in its own process (EnvProcess, started in parallel) when `timeout`
    > 0 (--env-timeout), else in this process."""
    if not timeout:
        return [envs.make(name, **kwargs) for _ in range(n)]
    started = [EnvProcess(name, kwargs, timeout, wait=False) for _ in range(n)]
    for env in started:
        env.ready()
    return started


def close_all():
    for env in list(LIVE):
        env.close()


class EnvProcess:
    """`envs.make(name, **kwargs)` living in a child process, with the same protocol (system_prompt, max_steps,
    tools, reset, step) and a time-out per call in seconds (> 0)."""

    def __init__(self, name: str, kwargs: dict, timeout: float, wait: bool = True):
        self.name, self.kwargs, self.timeout, self.pending = name, dict(kwargs), timeout, None
        self._launch()
        LIVE.add(self)
        if wait:
            self.ready()

    def _launch(self):
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.name, self.kwargs, list(sys.path)), daemon=True)
        self.proc.start()
        child.close()
        self.pending = "start"

    def ready(self):
        """Wait for the child's env to be built; its protocol attributes."""
        attrs = self.recv()
        self.env_class, self.system_prompt = attrs["class"], attrs["system_prompt"]  # what the child's env says
        self.max_steps, self.tools = attrs["max_steps"], attrs["tools"]

    def _replace(self):
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()
        self._launch()
        self.ready()

    def send(self, method: str, *args):
        """Start a call; `recv` returns its result (a child that died since the last call: EnvDied there)."""
        self.pending = method
        try:
            self.conn.send((method, args))
        except (OSError, ValueError):  # a broken pipe: recv finds the pipe closed and replaces the child
            pass

    def recv(self, deadline: float | None = None):
        """The pending call's result, or EnvTimeout at `deadline` (time.monotonic(); default: now + timeout) / EnvDied
        / EnvRaised. A timed-out or dead child is replaced before raising."""
        what, self.pending = self.pending, None
        if deadline is None and self.timeout:
            deadline = time.monotonic() + self.timeout
        try:
            while not (ready := self.conn.poll(1.0 if deadline is None else
                                               min(1.0, max(0.0, deadline - time.monotonic())))):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if stop_requested is not None and stop_requested():  # checked every second while waiting
                    self.proc.kill()
                    raise StopWaiting(f"{what} of {self.name} had not answered")
            ok, value = self.conn.recv() if ready else (None, None)
        except (EOFError, OSError):
            ok = value = None
            ready = "died"
        if ok is None:
            if ready:  # the pipe closed: the child is gone or going; reap it for its exit code
                self.proc.join(1)
            code = self.proc.exitcode
            if what == "start":  # a constructor that hangs or kills its process is no env: say so, once
                why = f"exit code {code}" if ready else f"no answer in {self.timeout:g} s"
                raise EnvDied(f"{self.name}: the env's process did not start ({why})")
            self._replace()
            if ready:
                raise EnvDied(f"{what}: the env's process ended without answering (exit code {code}); replaced")
            raise EnvTimeout(f"{what} did not return in {self.timeout:g} s (--env-timeout); the env's process was "
                             f"replaced")
        if not ok:
            if what == "start":
                raise ValueError(f"{self.name}: building the env in its process failed:\n{value}")
            raise EnvRaised(value)
        return value

    def reset(self, seed):
        self.send("reset", seed)
        return self.recv()

    def step(self, response):
        self.send("step", response)
        return self.recv()

    def close(self):
        LIVE.discard(self)
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        self.conn.close()
