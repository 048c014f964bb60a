"""Environments for StepPO: `envs.make(name, **kwargs)` and the protocol every env follows (docs/envs.md,
docs/extending.md for a complete plugin).

    env = envs.make("alfworld", split="train")      # or "multihop", "hotpotqa", "webshop", "my_pkg.my_mod:MyEnv"
    obs, info = env.reset(seed)                      # same seed -> same task (same info["task_id"])
    obs, reward, done, info = env.step(response)     # response: the model's raw text for the turn

The protocol, complete (what train.py and rollout.py call and read, nothing else):
- Constructor: `MyEnv(split="train", **env_kwargs)`. train.py builds `--envs-per-iter` envs with `split="train"` and
  the evaluation envs with `split=--eval-split` ("eval" by default; "valid" for choosing settings), each with the
  keys of `--env-kwargs` as keyword arguments. `split="train"` and `split="eval"` give disjoint task pools
  (multihop and alfworld also have "valid", disjoint from both). An env without a `split` argument is refused
  with a one-line error.
- `system_prompt` (str): instructions, including the action format. `max_steps` (int): turns per episode (the
  default of `--max-steps`).
- `tools` (optional): a list of JSON schemas in the OpenAI function format ({"type": "function", "function":
  {"name", "description", "parameters"}}) that rollout.py passes to the chat template (`apply_chat_template(...,
  tools=tools)`) so the model sees its own tool-call format; where the template renders them, observations go in
  as "tool" messages. The env still parses the raw response text itself and should describe its format in
  `system_prompt` for templates without tools.
- `reset(seed) -> (obs, info)`; `step(response) -> (obs, reward, done, info)`. Unparseable responses never raise
  (they are invalid steps); stepping after `done` raises RuntimeError. `obs` is a str (valid text: no lone
  surrogates), `reward` a finite real number, `info` a dict: rollout.py checks each at the boundary
  (`checked_reset`, `checked_step`) and ends the episode as an env error otherwise, as it does for an exception.
- Each env lives in its own process (envs/process.py; `--env-timeout`, default 600 s per call, 0 = in train.py's
  process): it is built there from `--env` and `--env-kwargs`, and what reset and step return must pickle (str,
  numbers, lists, dicts do). A call that hangs past the time-out ends its episode and the env is rebuilt.
- `info` always has:
    task_id    str, identical for the same task instance (the group key for GRPO/RLOO/GiGPO)
    won        bool, the task is solved (success rate; a trajectory's `success` is its last step's `won`)
    invalid    bool, the response could not be parsed or executed (the episode goes on; `invalid_rate`)
    admissible list[str] of valid actions, or None when the action space is open
    expert     the full response text that takes the expert's next action (e.g. "<action>go to cabinet 1</action>"),
               or None when there is no expert (or after done): the warm start's demonstrations
    prompt     a fresh self-contained user message for `--context window` (None: rollout.py builds one from the
               task, the last actions and the observation)
  and may have:
    truncated  bool, True when the env's own step limit ended the episode: a cut, not a terminal state (rollout.py
               then keeps the next state, for --bootstrap)
    score      float, a graded outcome of the episode, read from its last step and logged as `score` / `eval_score`
               (WebShop: 100 x the official reward)
    task_type  str, the kind of task (ALFWorld: pick, look, clean, heat, cool, pick_two; multihop: hops2..hops4;
               WebShop: the goal's product category), read from the last step: evaluation also reports
               `eval_success_rate_<type>` (and `eval_score_<type>`) per type

A plugin is found like any Python module: `--env my_module:MyEnv` imports `my_module` from `PYTHONPATH`
(`PYTHONPATH=/path/to/dir python train.py --env my_module:MyEnv`), an installed package, or the working directory
(`make` adds it to the end of `sys.path`, so `cd plugins && python ../train.py --env my_module:MyEnv` works too).
"""
import importlib
import inspect
import json
import os
import sys

REGISTRY = {
    "alfworld": "envs.alfworld:AlfWorldEnv",
    "multihop": "envs.multihop:MultiHopEnv",
    "hotpotqa": "envs.hotpotqa:HotpotQAEnv",
    "webshop": "envs.webshop:WebShopEnv",
}


def load_class(spec):
    """Import `"module.path:ClassName"` and return the class."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ImportError("expected 'module.path:ClassName'")
    cls = getattr(importlib.import_module(module), name)
    if not isinstance(cls, type):
        raise TypeError("%s is a %s, not a class" % (spec, type(cls).__name__))
    return cls


def check_arguments(env_cls, kwargs):
    """A ValueError naming the argument `env_cls` does not take (`split`, or a key of --env-kwargs); None if it takes all."""
    try:
        params = inspect.signature(env_cls).parameters
    except (TypeError, ValueError):  # a signature Python cannot read (a C extension): let the call decide
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for key, value in kwargs.items():
        if key not in params:
            if key == "split":
                raise ValueError("%s.__init__ takes no `split` argument: train.py builds every env with split='train' "
                                 "or split=<--eval-split> (add `split=\"train\"` to it; envs/__init__.py)" % env_cls.__name__)
            raise ValueError("%s.__init__ takes no argument %r (from --env-kwargs?)" % (env_cls.__name__, key))
        default = params[key].default  # its type is the type the argument takes (JSON has no other way to say it)
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
        if kinds and not (isinstance(value, kinds) and (isinstance(default, bool) or not isinstance(value, bool))):
            raise ValueError("%s.__init__ argument %r takes a %s (its default is %r), not %r (from --env-kwargs)"
                             % (env_cls.__name__, key, type(default).__name__, default, value))


def make(name, **kwargs):
    """Build an environment by built-in name or by `"module:Class"`; kwargs go to its constructor."""
    if name in REGISTRY:
        env_cls = load_class(REGISTRY[name])
    elif ":" in name:
        if os.getcwd() not in sys.path:  # a plugin in the working directory, whichever folder train.py is in
            sys.path.append(os.getcwd())
        try:
            env_cls = load_class(name)
        except (ImportError, AttributeError, TypeError) as e:
            raise ValueError("cannot load environment class %r (%s: %s); a plugin module is imported from PYTHONPATH, "
                             "an installed package or the working directory" % (name, type(e).__name__, e)) from e
    else:
        raise ValueError("unknown environment %r: built-in ones are %s, or give a plugin as 'module.path:ClassName'"
                         % (name, ", ".join(sorted(REGISTRY))))
    check_arguments(env_cls, kwargs)
    return env_cls(**kwargs)


def check(name, kwargs_json: str, splits: list) -> str | None:
    """Why `train.py --env name --env-kwargs kwargs_json` cannot run, in one line, or None. Builds the env once per
    split (in the order given: the same error every time): an unknown name, a broken plugin, missing data."""
    try:
        kwargs = json.loads(kwargs_json)
        assert isinstance(kwargs, dict)
    except (ValueError, AssertionError):
        return f"--env-kwargs must be a JSON object, not {kwargs_json!r}"
    try:
        for split in dict.fromkeys(splits):
            env = make(name, split=split, **kwargs)
            steps = getattr(env, "max_steps", 1)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                return f"--env {name!r}: its max_steps must be a whole number >= 1, not {steps!r}"
    except Exception as e:
        return f"--env {name!r}: {e}"
    return None
