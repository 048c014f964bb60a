"""Environments for StepPO: `envs.make(name, **kwargs)` and the protocol every env follows.

    env = envs.make("alfworld", split="train")      # or "multihop", "hotpotqa", or "my_pkg.my_mod:MyEnv"
    obs, info = env.reset(seed)                      # same seed -> same task (same info["task_id"])
    obs, reward, done, info = env.step(response)     # response: the model's raw text for the turn

An env has `system_prompt` (instructions incl. the action format) and `max_steps`, and may have `tools`: a list of
JSON schemas in the OpenAI function format ({"type": "function", "function": {"name", "description", "parameters"}})
that rollout.py passes to the chat template (`apply_chat_template(..., tools=tools)`) so the model sees its own
tool-call format; where the template renders them, observations then go in as "tool" messages. The env still
parses the raw response text itself and should describe its format in `system_prompt` for templates without
tools. `info` always has:
    task_id    str, identical for the same task instance (the group key for GRPO/GiGPO-style baselines)
    won        bool, the task is solved
    invalid    bool, the response could not be parsed or executed (the episode goes on)
    admissible list[str] of valid actions, or None when the action space is open
    expert     the full response text that takes the expert's next action (e.g.
               "<action>go to cabinet 1</action>"), or None when there is no expert (or after done)
    prompt     a fresh self-contained user message for the "window" context mode
Unparseable responses never raise; stepping after `done` raises RuntimeError. `split="train"` and
`split="eval"` give disjoint task pools (multihop and alfworld also have `split="valid"`, disjoint from both, for
choosing settings). A user's own env is any class with this interface, loaded by
`"module.path:ClassName"` (the plugin path forks use).
"""
import importlib

REGISTRY = {
    "alfworld": "envs.alfworld:AlfWorldEnv",
    "multihop": "envs.multihop:MultiHopEnv",
    "hotpotqa": "envs.hotpotqa:HotpotQAEnv",
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


def make(name, **kwargs):
    """Build an environment by built-in name or by `"module:Class"`; kwargs go to its constructor."""
    if name in REGISTRY:
        return load_class(REGISTRY[name])(**kwargs)
    if ":" in name:
        try:
            env_cls = load_class(name)
        except (ImportError, AttributeError, TypeError) as e:
            raise ValueError("cannot load environment class %r (%s: %s)" % (name, type(e).__name__, e)) from e
        return env_cls(**kwargs)
    raise ValueError("unknown environment %r: built-in ones are %s, or give a plugin as 'module.path:ClassName'"
                     % (name, ", ".join(sorted(REGISTRY))))
