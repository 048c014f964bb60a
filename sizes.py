"""What a run will hold in host memory, estimated before it builds its envs (docs/scaling.md, "Long runs").

    problem = host_memory_problem(cfg, probe_env, tok, max_len, max_steps)   # None, or one line: what cannot fit

After the models are loaded (they are already in memory), the rest of a run's host memory grows with its sizes: the
episodes of an iteration (`--envs-per-iter`, times 1 + `--filter-rounds` under `--filter-groups`), of an evaluation
(`--eval-episodes`) and of the warm start (`--sft-episodes`) are held whole, and every env is an object (or a
process, `--env-timeout`). The estimate, per episode, from one probe env's first observation:
  context at turn t = min(max_len, P0 + t (N + O))   P0: the first prompt's tokens, N: --max-new-tokens, O: the first
                                                      observation's tokens (later ones are taken to be as long)
  bytes = 36 x sum_t context_t (--context full: each step keeps its prompt as a list of Python ints; window: P0 + N)
        + 32 x T N (the action's ids and log-probs)
and an env process is counted ENV_PROCESS_BYTES. A run whose estimate exceeds the memory the machine has available
(MemAvailable, /proc/meminfo) is refused in one line; elsewhere (no /proc) nothing is checked. An estimate, meant to
catch sizes off by orders of magnitude (`--envs-per-iter 100000`), not to predict a peak.
"""
from rollout import encode, first_prompt

INT_BYTES, FLOAT_BYTES = 36, 32  # a Python int or float in a list: the object and its pointer
ENV_PROCESS_BYTES = 32 * 2**20  # what a forked env process adds, its own pages (measured: multihop 8.4 MiB, generated
# ALFWorld 28.5 MiB when the trainer built one ALFWorld env before forking, as train.py does; 132 MiB without)


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def episode_bytes(p0: int, obs: int, new: int, steps: int, max_len: int, full: bool) -> int:
    """The estimate above for one episode of `steps` turns."""
    contexts = [min(max_len, p0 + t * (new + obs)) if full else min(max_len, p0 + new) for t in range(steps)]
    return INT_BYTES * sum(contexts) + FLOAT_BYTES * steps * new


def host_memory_problem(cfg, env, tok, max_len: int, max_steps: int) -> str | None:
    """Why this run's episodes and envs cannot fit in the host memory available now, in one line, or None."""
    free = available_bytes()
    if free is None:
        return None
    obs, _ = env.reset(seed=0)
    p0 = len(first_prompt(tok, env.system_prompt, str(obs), getattr(env, "tools", None)))
    one = episode_bytes(p0, len(encode(tok, str(obs))), cfg.max_new_tokens, max_steps, max_len, cfg.context == "full")
    episodes = {"--envs-per-iter": cfg.envs_per_iter * (1 + cfg.filter_rounds * cfg.filter_groups),
                "--eval-episodes": cfg.eval_episodes, "--sft-episodes": cfg.sft_episodes * bool(cfg.sft_steps)}
    n_envs = cfg.envs_per_iter + min(cfg.eval_episodes, cfg.envs_per_iter)
    need = {k: n * one for k, n in episodes.items()}
    need["their env processes"] = n_envs * ENV_PROCESS_BYTES * (cfg.env_timeout > 0)  # --envs-per-iter + eval envs
    peak = max(need["--sft-episodes"], sum(need.values()) - need["--sft-episodes"])  # the warm start's episodes
    if peak <= free:  # are gone before the first iteration
        return None
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    parts = ", ".join(f"{k} {gib(v)}" for k, v in need.items() if v)
    return (f"this run would hold ~{gib(peak)} in host memory ({parts}; ~{one / 2**10:.0f} KiB per "
            f"episode of {max_steps} turns), {gib(free)} is available: lower those sizes (or --context window, "
            f"--max-steps)")
