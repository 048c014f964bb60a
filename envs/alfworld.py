"""ALFWorld (text) on its real engine: TextWorld-PDDL games, the `alfred` domain, ALFWorld's experts.

Games come from a folder in the official layout, `<data_dir>/json_2.1.1/<split>/<task>/<trial>/game.tw-pddl`
next to `traj_data.json` (`data_dir=` or `$ALFWORLD_DATA`), or, when there is none, from games generated
offline by `envs/alfworld_gen.py` into a cache folder (`cache_dir=`, `$STEPPO_CACHE/alfworld` or
`~/.cache/steppo/alfworld`, keyed by generator version and scene size). A data folder the user named
(`data_dir=`, or `$ALFWORLD_DATA` set to anything but alfworld's own default, which its import creates
empty) must hold the split's games: a typo or a half-copied folder is an error, never a silent switch to
generated games. The same loader serves both:
games sorted by relative path and then dealt round-robin over task types (so the first k games, e.g. an
evaluation of k episodes, mix all types), `reset(seed)` plays game `seed % n_games`, and `info["task_id"]` is
the game's path relative to the data folder. `split="train"` reads `train/`, `split="valid"` reads
`valid_seen/` (for choosing settings) and `split="eval"` reads `valid_unseen/` (what is reported). Generated
eval scenes never repeat a train scene, and generated valid scenes are in neither train nor eval.

Each env loads games with `textworld.start` and the wrappers of `AlfredTWEnv.init_env` (AlfredDemangler,
AlfredInfos, AlfredExpert), fixing two alfworld 0.4.2 pitfalls: `expert_type="planner"` is passed as a
keyword (AlfredTWEnv passes it positionally, so it is ignored) and every env owns its own engine
(batched sync envs share wrappers and all play the last game). A game stays loaded while the env
replays it, so `reset` of the same game skips parsing the game file.

Turn format (same as envs/multihop.py). The model answers in free text; the LAST `<action>...</action>`
block is the action (tags case-insensitive, whitespace collapsed, lower-cased). Text without the tag,
or an action that is not admissible, is invalid: the engine is not stepped, the observation says what
went wrong and lists the admissible actions, `info["invalid"]` is True, the reward is `-invalid_penalty`
and the episode goes on (the turn still counts toward `max_steps`).

Expert. `info["expert"]` is the next action of ALFWorld's PDDL planner (`expert="planner"`, default), which knows
where every object is, or of its rule-based agent (`expert="handcoded"`), which looks around first and searches the
receptacles where such objects usually are, from what it has seen: a policy a model can imitate from its prompts,
so cloning it carries over to unseen scenes (it draws ties from Python's global `random`, which train.py seeds;
where it gives up, `info["expert"]` is None). `expert_slip=p` makes either fallible like multihop's: in a fraction p
of episodes (drawn from the reset seed) it stops one action short of the goal (by the planner's count) and looks
around until the step limit, so it loses. Demonstrations then carry a habit the reward can unlearn
(bench/bench_learning.py uses it); the default 0 is the expert as ALFWorld ships it.

Observations. `reset`/`step` return the engine's text followed by the admissible actions: the message
for the next turn when the whole conversation is kept ("full" context). `info["prompt"]` is the paper's
"window" ALFWorld prompt, a fresh self-contained user message: task, number of steps taken, the last
`history` (action, observation) pairs, the current observation and the admissible actions.
"""
import functools
import glob
import itertools
import json
import os
import random
import shutil

from envs import alfworld_gen
from envs.alfworld_tw import load_tw_env
from envs.multihop import ACTION_RE  # <action>...</action>, the last block counts

SYSTEM_PROMPT = (
    "You are an expert agent operating in the ALFRED embodied household environment. Each turn you see "
    "what happened and the list of admissible actions. Choose exactly one admissible action and write it "
    "inside an action tag, for example <action>go to cabinet 1</action>. You may think briefly before the "
    "tag; only the last <action>...</action> block is executed. You succeed when the task is completed.")
ALFWORLD_DEFAULT_DATA = os.path.expanduser("~/.cache/alfworld")  # alfworld sets $ALFWORLD_DATA to it on import


def parse_action(response):
    """The last `<action>...</action>` block of `response`, normalised (lower case, single spaces), or None."""
    found = ACTION_RE.findall(response or "")
    if not found:
        return None
    action = " ".join(found[-1].split()).strip(" .'\"`").lower()
    return action or None


@functools.lru_cache(maxsize=16)
def collect_games(data_dir, split_dir, task_types=None):
    """Game files under `data_dir/json_2.1.1/<split_dir>`, in the module docstring's order, filtered like
    `AlfredTWEnv.collect_game_files`: needs traj_data.json, a game file with `solvable: true`, no
    movable/sliced trials, and (optionally) a task type in the tuple `task_types`. Cached per process: the
    official train split has thousands of games and train.py builds dozens of envs."""
    root = os.path.join(data_dir, "json_2.1.1", split_dir)
    games = []
    for traj_path in sorted(glob.glob(os.path.join(root, "**", "traj_data.json"), recursive=True)):
        folder = os.path.dirname(traj_path)
        game_path = os.path.join(folder, "game.tw-pddl")
        if "movable" in folder or "Sliced" in folder or not os.path.exists(game_path):
            continue
        if task_types is not None and json.load(open(traj_path))["task_type"] not in task_types:
            continue
        if not json.load(open(game_path)).get("solvable", False):
            continue
        games.append(game_path)
    by_type = {}  # <task_type>-<object>-.../<trial>/game.tw-pddl: deal the sorted games round-robin over types
    for g in sorted(games, key=lambda p: os.path.relpath(p, data_dir)):
        by_type.setdefault(os.path.basename(os.path.dirname(os.path.dirname(g))).split("-")[0], []).append(g)
    return tuple(g for row in itertools.zip_longest(*by_type.values()) for g in row if g is not None)


def generated_games(split, n_games, cfg, cache_dir=None):
    """Paths of the generated pool (`n_games` games of `split`), generating it on first use.

    The pool is written to a temporary folder and renamed into place, so concurrent processes (torchrun)
    never see half a pool; generation is deterministic, so whichever process wins writes the same games."""
    cache_dir = cache_dir or os.path.join(os.environ.get("STEPPO_CACHE", os.path.expanduser("~/.cache/steppo")),
                                          "alfworld")
    key = "v%d-r%d-d%d-p%d-n%d" % (alfworld_gen.GEN_VERSION, cfg.n_receptacles, cfg.n_distractors,
                                    cfg.max_plan_len, n_games)
    root = os.path.join(cache_dir, key)
    split_dir = alfworld_gen.SPLIT_DIRS[split]
    final = os.path.join(root, "json_2.1.1", split_dir)
    if not os.path.isdir(final):
        tmp = os.path.join(cache_dir, "tmp-%s-%s-%d" % (key, split, os.getpid()))
        avoid = set()  # held-out scenes are new: eval avoids train's, valid avoids both
        for other in {"eval": ["train"], "valid": ["train", "eval"]}.get(split, []):
            avoid |= alfworld_gen.pool_signatures(other, n_games, cfg)
        alfworld_gen.generate(tmp, split, n_games, cfg, avoid=avoid)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(os.path.join(tmp, "json_2.1.1", split_dir), final)
        except OSError:
            pass  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root, collect_games(root, split_dir)


class AlfWorldEnv:
    """One ALFWorld episode at a time (see the module docstring for the protocol)."""

    def __init__(self, split="train", data_dir=None, n_games=None, max_steps=30, invalid_penalty=0.0,
                 history=3, task_types=None, cache_dir=None, n_receptacles=4, n_distractors=1, max_plan_len=12,
                 expert="planner", expert_slip=0.0):
        """split: "train", "valid" or "eval". data_dir: folder holding json_2.1.1/ (default $ALFWORLD_DATA, else
        generated games). n_games: pool size (generated default 60; official default all). task_types:
        keep only these task types. n_receptacles / n_distractors / max_plan_len: generated scene size.
        expert: "planner" or "handcoded"; expert_slip: fraction of episodes whose expert stops one action short
        (module docstring)."""
        if expert not in ("planner", "handcoded"):
            raise ValueError("expert must be 'planner' or 'handcoded', not %r" % (expert,))
        if split not in alfworld_gen.SPLIT_DIRS:
            raise ValueError("split must be 'train', 'valid' or 'eval', not %r" % (split,))
        if not 0.0 <= expert_slip <= 1.0:
            raise ValueError("expert_slip must be in [0, 1], not %r" % (expert_slip,))
        self.split, self.max_steps, self.invalid_penalty, self.history = split, max_steps, invalid_penalty, history
        self.expert, self.expert_slip = expert, expert_slip
        self.system_prompt = SYSTEM_PROMPT
        split_dir = alfworld_gen.SPLIT_DIRS[split]
        task_types = tuple(task_types) if task_types is not None else None
        env_dir = os.environ.get("ALFWORLD_DATA")
        if data_dir is None and env_dir and (os.path.realpath(env_dir) != os.path.realpath(ALFWORLD_DEFAULT_DATA)
                                             or os.path.isdir(os.path.join(env_dir, "json_2.1.1"))):
            data_dir = env_dir  # the user's folder (or official data downloaded to alfworld's default place)
        if data_dir is not None:
            self.data_dir = data_dir
            self.games = list(collect_games(data_dir, split_dir, task_types)[:n_games])
            if not self.games:
                raise ValueError("no ALFWorld games for split=%r in %r: expected json_2.1.1/%s/<task>/<trial>/"
                                 "game.tw-pddl next to traj_data.json (data_dir= or $ALFWORLD_DATA; leave both "
                                 "unset to play generated games)" % (split, os.path.abspath(data_dir), split_dir))
        else:
            cfg = alfworld_gen.GenConfig(n_receptacles, n_distractors, max_plan_len)
            self.data_dir, games = generated_games(split, n_games or 60, cfg, cache_dir)
            self.games = [g for g in games if task_types is None or _task_type(g) in task_types]
        if not self.games:
            raise ValueError("no ALFWorld games found for split=%r under %r" % (split, self.data_dir))
        self._tw, self._loaded, self.done = None, None, True

    def __len__(self):
        return len(self.games)

    def reset(self, seed):
        """Start game `seed % n_games`; returns (observation, info)."""
        path = self.games[seed % len(self.games)]
        if self._tw is None:
            self._tw = load_tw_env(expert=self.expert)
        if path != self._loaded:
            self._tw.load(path)
            self._loaded = path
        self._state = self._tw.reset()
        self.task_id = os.path.relpath(path, self.data_dir)
        self.task_type = TASK_TYPES.get(_task_type(path), _task_type(path))  # the papers' six, per-type evaluation
        intro = self._state["feedback"]
        self.task = intro.split("Your task is to: ", 1)[-1].strip()
        self.obs = intro.split("=-", 1)[-1].split("Your task is to:")[0].strip()
        self.t, self.done, self.won, self.trace = 0, False, False, []
        self.slip = random.Random(seed * 7919 + 17).random() < self.expert_slip  # as envs/multihop.py
        return self._observation(intro), self._info(invalid=False, action=None)

    def step(self, response):
        """Parse the model's raw text, play it; returns (observation, reward, done, info)."""
        if self.done:
            raise RuntimeError("step() called after the episode ended; call reset(seed) first")
        self.t += 1
        action = parse_action(response)
        admissible = self._state["admissible_commands"]
        if action in admissible:
            self._state, _, _ = self._tw.step(action)
            self.won = bool(self._state["won"])
            feedback, reward, invalid = self._state["feedback"].strip(), float(self.won), False
        else:
            if action is None:
                feedback = "Invalid response: no <action>...</action> block found."
            else:
                feedback = 'Invalid action "%s": it is not one of the admissible actions.' % action[:80]
            feedback += " Reply with one admissible action inside the tag, e.g. <action>%s</action>." % admissible[0]
            reward, invalid = -float(self.invalid_penalty) if self.invalid_penalty else 0.0, True
        self.obs = feedback
        self.trace.append((action or "(invalid)", feedback))
        self.done = self.won or self.t >= self.max_steps
        info = self._info(invalid=invalid, action=action)
        info["truncated"] = self.done and not self.won
        return self._observation(feedback), reward, self.done, info

    # -----------------------------------------------------------------------------------------
    def _observation(self, text):
        if self.done:
            return text
        return "%s\n\nAdmissible actions: %s" % (text.strip(), ", ".join(self._state["admissible_commands"]))

    def _info(self, invalid, action):
        plan = self._state.get("extra.expert_plan") or []
        if self.slip and len(self._state.get("policy_commands") or []) == 1:  # one action from the goal (planner's
            plan = ["look"]  # count): a slipping expert looks around instead
        admissible = list(self._state["admissible_commands"])
        return dict(task_id=self.task_id, won=self.won, invalid=invalid, admissible=admissible,
                    expert=None if self.done or not plan else "<action>%s</action>" % plan[0],
                    prompt=self.render_prompt(), action=action, step=self.t, task_type=self.task_type)

    def render_prompt(self):
        """The "window" prompt (paper's ALFWorld recipe): task, recent history, observation, admissible."""
        adm = ", ".join("'%s'" % a for a in self._state["admissible_commands"])
        head = "Your task is to: %s\n" % self.task
        if self.t == 0:
            body = "Your current observation is: %s\n" % self.obs
        else:
            recent = self.trace[-self.history:] if self.history > 0 else []
            hist = "\n".join("[Step %d] action: %s -> observation: %s" % (self.t - len(recent) + i + 1, a, o)
                             for i, (a, o) in enumerate(recent))
            body = ("Prior to this step, you have already taken %d step(s). Below are the most recent %d "
                    "actions and the observations that followed:\n%s\nYou are now at step %d and your current "
                    "observation is: %s\n" % (self.t, len(recent), hist, self.t + 1, self.obs))
        return (head + body + "Your admissible actions of the current situation are: [%s].\n"
                "Think briefly if you like, then give exactly one admissible action as <action>...</action>." % adm)


TASK_TYPES = {"pick_and_place_simple": "pick", "look_at_obj_in_light": "look", "pick_clean_then_place_in_recep": "clean",
              "pick_heat_then_place_in_recep": "heat", "pick_cool_then_place_in_recep": "cool",
              "pick_two_obj_and_place": "pick_two"}  # ALFWorld's task types, as the ALFWorld / GiGPO / StepPO tables name them


@functools.lru_cache(maxsize=4096)
def _task_type(game_path):
    return json.load(open(os.path.join(os.path.dirname(game_path), "traj_data.json")))["task_type"]
