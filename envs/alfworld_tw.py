"""ALFWorld's TextWorld engine, as envs/alfworld.py plays it and envs/alfworld_gen.py checks the games it writes:
`load_tw_env` builds a PDDL TextWorld env with ALFWorld's own wrappers (demangler, infos, expert), with the parsed
domains of recent games cached and TextWorld's template parser memoised (both exact, ~3x faster env steps together).
"""
import copy
import functools
import json
from collections import OrderedDict

import textworld
from textworld.envs.pddl import logic as pddl_logic, textgen as pddl_textgen
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
from alfworld.agents.expert import HandCodedAgentFailed


class CachedPddlEnv(textworld.envs.PddlEnv):
    """TextWorld's PddlEnv, keeping the parsed domain + grammar (`GameLogic`) of the last `cache_size`
    games: parsing them with TatSu is ~75% of `load`. Same engine, same game files, same state."""

    def __init__(self, infos=None, cache_size=64):
        super().__init__(infos)
        self._logics, self.cache_size = OrderedDict(), cache_size

    def load(self, path):
        try:
            with open(path) as f:
                data = json.load(f)
            key = (data["pddl_domain"], data["grammar"])
            data["pddl_problem"]  # noqa: B018 (read below: a missing field is named here, with the file)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            what = f"no field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"alfworld: game file {path} is not a TextWorld PDDL game (a JSON object with "
                             f"pddl_domain, grammar, pddl_problem): {what}") from None
        logic = self._logics.pop(key, None) or pddl_logic.GameLogic(domain=key[0], grammar=key[1])
        self._logics[key] = logic
        while len(self._logics) > self.cache_size:
            self._logics.popitem(last=False)
        self._game_file, self._game_data, self.walkthrough = path, data, data.get("walkthrough")
        self._logic = logic
        self._pddl_state = pddl_logic.PddlState(self.downward_lib, data["pddl_problem"], logic)
        self._entity_infos = self._get_entity_infos()


class GivingUpExpert(AlfredExpert):
    """AlfredExpert whose handcoded agent may give up (HandCodedAgentFailed: its subgoals are done but the goal is
    not, e.g. after the model put the object elsewhere): then there is no expert action, not a crash mid-run."""

    def _gather_infos(self):
        try:
            super()._gather_infos()
        except HandCodedAgentFailed:
            self.state["extra.expert_plan"] = []


_parse_cached = functools.lru_cache(maxsize=1 << 16)(pddl_textgen._parse_and_convert)


def _parse_template(*args, **kwargs):
    """TextWorld's grammar-template parser, memoised: it re-parses every template with TatSu on every step and
    load (~45% of env time). Derivation writes into the parsed symbols, so each call gets a deep copy: the same
    text comes out (test_alfworld_memoised_templates_play_the_same_text), ~1.7x faster."""
    return copy.deepcopy(_parse_cached(*args, **kwargs))


pddl_textgen._parse_and_convert = _parse_template


def load_tw_env(path=None, cache_size=64, expert="planner"):
    """A TextWorld env with ALFWorld's wrappers and its `expert` ("planner" or "handcoded"), optionally with `path`
    loaded. The planner's remaining plan is always in `state["policy_commands"]` (the slip rule reads it)."""
    infos = textworld.EnvInfos(won=True, admissible_commands=True, policy_commands=True,
                               extras=["gamefile", "expert_plan"])
    env = CachedPddlEnv(infos, cache_size)
    for wrapper in [AlfredDemangler(shuffle=False), AlfredInfos, GivingUpExpert(expert_type=expert)]:
        env = wrapper(env)  # same wrappers as AlfredTWEnv.init_env, as textworld.start applies them
    if path is not None:
        env.load(path)
    return env
