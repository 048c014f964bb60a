"""Offline ALFWorld game generator: seeded TextWorld-PDDL games in the official layout.

ALFWorld's official games (`json_2.1.1/...`) come from a download these machines cannot reach.
This file writes games of the same format with the real ALFWorld domain (`alfworld/data/alfred.pddl`),
grammar (`alfred.twl2`) and vocabulary (`alfworld.gen.constants`), so the one loader in
`envs/alfworld.py` serves both. Layout, as in the official release:

    <root>/json_2.1.1/<split>/<task_type>-<Obj>-None-<Recep>-<scene>/trial_G<seed>/game.tw-pddl
                                                                       /traj_data.json

A game file is JSON with `pddl_domain`, `grammar` (after `add_task_to_grammar`, RNG seeded),
`pddl_problem`, `solvable: true` and `walkthrough` (the planner's plan). A scene is small by default:
the receptacles the task needs plus a few distractors, each at its own location, and an agent that
starts at a location with no receptacle. Only games the PDDL planner solves, that are not already won
at reset, and whose walkthrough actually wins on the engine are kept.

    python -m envs.alfworld_gen --root /tmp/alfw --split train --n_games 12
"""
import argparse
import json
import os
import random
import re
from dataclasses import dataclass

import alfworld
import alfworld.gen.constants as C
import alfworld.gen.goal_library as glib
from alfworld.agents.utils.misc import add_task_to_grammar

from envs.alfworld_tw import load_tw_env

GEN_VERSION = 2  # bump when the generated games change; part of the cache key
TASK_TYPES = ["pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"]
DATA_DIR = os.path.join(os.path.dirname(alfworld.__file__), "data")
SPLIT_DIRS = {"train": "train", "valid": "valid_seen", "eval": "valid_unseen"}  # our split name -> official folder

# Receptacles a scene may contain (static ones; movable receptacles such as Bowl are objects here).
RECEPTACLES = sorted(set(C.VAL_RECEPTACLE_OBJECTS) - set(C.MOVABLE_RECEPTACLES))
LAMP_HOLDERS = ["Desk", "Dresser", "SideTable"]  # where a DeskLamp stands (it is not pickupable)
PICKABLE = sorted({o for objs in C.VAL_RECEPTACLE_OBJECTS.values() for o in objs}
                  - set(C.MOVABLE_RECEPTACLES) - {o for o in C.OBJECTS_WSLICED if o.endswith("Sliced")})
NEEDS = {"pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),
         "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
         "pick_cool_then_place_in_recep": ("Coolable", "Fridge")}


@dataclass
class GenConfig:
    n_receptacles: int = 4
    """receptacles per scene (at least the ones the task needs)"""
    n_distractors: int = 1
    """objects besides the task's target object(s)"""
    max_plan_len: int = 12
    """discard games whose expert plan is longer"""


def mangle(text):
    """ALFRED id -> PDDL name, as `PlannedGameState.fix_pddl_str_chars` (simultaneous replacement)."""
    table = {"-": "_minus_", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
    return re.sub(r"[-|+.,]", lambda m: table[m.group(0)], text)


def alfred_id(rng, kind):
    """ALFRED-style object id, e.g. `Apple|-01.49|+00.93|-02.57`; sinks/baths end in `SinkBasin`."""
    xyz = "|".join("%+06.2f" % rng.uniform(-3, 3) for _ in range(3))
    if kind == "SinkBasin":
        return "Sink|%s|SinkBasin" % xyz
    if kind == "BathtubBasin":
        return "Bathtub|%s|BathtubBasin" % xyz
    return "%s|%s" % (kind, xyz)


def holders(obj):
    """Static receptacle types that can contain object type `obj`."""
    return [r for r in RECEPTACLES if obj in C.VAL_RECEPTACLE_OBJECTS[r]]


# ---------------------------------------------------------------------------------------------
# Scene sampling (pure Python, no engine)
# ---------------------------------------------------------------------------------------------
def sample_scene(rng, task_type, cfg):
    """Sample a small scene for `task_type`; returns a dict or None if this draw does not fit."""
    prop_recep = NEEDS.get(task_type)
    objs = [o for o in PICKABLE if len(holders(o)) >= 2]
    if prop_recep:
        objs = [o for o in objs if o in C.VAL_ACTION_OBJECTS[prop_recep[0]]]
    obj = rng.choice(objs)
    toggle = "DeskLamp" if task_type == "look_at_obj_in_light" else ""
    if toggle:
        parent = ""
        need = [rng.choice(holders(obj)), rng.choice(LAMP_HOLDERS)]  # where the object is, where the lamp is
    else:
        tool = prop_recep[1] if prop_recep else None  # the sink/microwave/fridge: never the start or the goal
        targets = [r for r in holders(obj) if r != tool]  # as ALFRED's task sampler (task_game_state.py)
        parent = rng.choice(targets) if targets else None
        sources = [r for r in holders(obj) if r not in (parent, tool)]
        if not parent or not sources:
            return None
        need = [parent, rng.choice(sources)]
        if task_type == "pick_two_obj_and_place":
            need.append(rng.choice(sources))
        if prop_recep:
            need.append(prop_recep[1])
    # receptacle kinds, with instance counts (cabinet 1, cabinet 2, ...)
    kinds = list(dict.fromkeys(need))  # unique, ordered
    while len(kinds) < cfg.n_receptacles:
        kinds.append(rng.choice(RECEPTACLES))
    receps = [(k, alfred_id(rng, k)) for k in kinds]
    rng.shuffle(receps)
    by_kind = {}
    for k, rid in receps:
        by_kind.setdefault(k, []).append(rid)
    # place objects: (type, id, receptacle id)
    placed = []
    n_target = 2 if task_type == "pick_two_obj_and_place" else 1
    for _ in range(n_target):
        src_kinds = [k for k in by_kind if k != parent and k in holders(obj) and not (prop_recep and k == prop_recep[1])]
        placed.append((obj, alfred_id(rng, obj), rng.choice(by_kind[rng.choice(src_kinds)])))
    if toggle:
        lamp_kinds = [k for k in by_kind if k in LAMP_HOLDERS]
        placed.append((toggle, alfred_id(rng, toggle), rng.choice(by_kind[rng.choice(lamp_kinds)])))
    for _ in range(cfg.n_distractors):
        d = rng.choice([o for o in PICKABLE if o != obj and any(k in holders(o) for k in by_kind)])
        placed.append((d, alfred_id(rng, d), rng.choice(by_kind[rng.choice([k for k in by_kind if k in holders(d)])])))
    return dict(task_type=task_type, obj=obj, parent=parent, toggle=toggle, receps=receps, placed=placed,
                scene=rng.randint(1, 430))


def signature(scene):
    """What makes two scenes the same task, ignoring coordinates (used to keep splits disjoint)."""
    kinds = sorted(k for k, _ in scene["receps"])
    where = {rid: k for k, rid in scene["receps"]}
    objs = sorted((t, where[r]) for t, _, r in scene["placed"])
    return (scene["task_type"], scene["obj"], scene["parent"], tuple(kinds), tuple(objs))


# ---------------------------------------------------------------------------------------------
# PDDL problem, traj_data and game file
# ---------------------------------------------------------------------------------------------
def pddl_problem(scene, rng, name):
    """The scene as a PDDL problem for the `alfred` domain (facts as in the official games)."""
    loc = lambda: "loc|%d|%d|%d|%d" % (rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(0, 3),
                                       rng.choice([0, 15, 30, 45, 60]))
    start = loc()
    recep_loc = {}
    for _, rid in scene["receps"]:
        recep_loc[rid] = loc()
        while recep_loc[rid] in list(recep_loc.values())[:-1] or recep_loc[rid] == start:
            recep_loc[rid] = loc()
    rkinds = sorted({k for k, _ in scene["receps"]})
    okinds = sorted({t for t, _, _ in scene["placed"]})
    fact = lambda pred, *args: "(%s %s)" % (pred, " ".join(mangle(a) for a in args))
    objects = [("agent1", "agent")] + [(k + "Type", "rtype") for k in rkinds] + [(k + "Type", "otype") for k in okinds]
    objects += [(rid, "receptacle") for _, rid in scene["receps"]] + [(oid, "object") for _, oid, _ in scene["placed"]]
    objects += [(l, "location") for l in sorted(set(recep_loc.values()) | {start})]
    init = [fact("atLocation", "agent1", start)]
    for k, rid in scene["receps"]:
        init += [fact("receptacleType", rid, k + "Type"), fact("receptacleAtLocation", rid, recep_loc[rid])]
        if k in C.OPENABLE_CLASS_SET:
            init.append(fact("openable", rid))
    for r in rkinds:
        init += [fact("canContain", r + "Type", o + "Type") for o in okinds if o in C.VAL_RECEPTACLE_OBJECTS[r]]
    for t, oid, rid in scene["placed"]:
        init += [fact("objectType", oid, t + "Type"), fact("inReceptacle", oid, rid),
                 fact("objectAtLocation", oid, recep_loc[rid])]
        init.append(fact("toggleable" if t in C.VAL_ACTION_OBJECTS["Toggleable"] else "pickupable", oid))
        for prop in ["Cleanable", "Heatable", "Coolable", "Sliceable"]:
            if t in C.VAL_ACTION_OBJECTS[prop]:
                init.append(fact(prop.lower(), oid))
    goal = glib.gdict[scene["task_type"]]["pddl"].format(obj=scene["obj"], recep=scene["parent"],
                                                         toggle=scene["toggle"], mrecep="")
    goal = goal.replace("#", "-").strip()  # goal_library writes types as '# type'; it also closes (define
    text = "(define (problem %s)\n(:domain alfred)\n(:objects\n        %s\n        )\n(:init\n        %s\n        )\n%s\n" % (
        name, "\n        ".join("%s - %s" % (mangle(o), t) for o, t in objects), "\n        ".join(init), goal)
    return text


def traj_data(scene, task_id):
    """A minimal `traj_data.json` with the fields ALFWorld's loaders read."""
    params = dict(object_target=scene["obj"], parent_target=scene["parent"], toggle_target=scene["toggle"],
                  mrecep_target="", object_sliced=False)
    return dict(task_id=task_id, task_type=scene["task_type"], pddl_params=params,
                scene=dict(scene_num=scene["scene"], random_seed=0), turk_annotations=dict(anns=[]))


def make_game(seed, split, cfg, task_type=None):
    """Build one game from `seed` (deterministic). Returns (relative dir, traj_data, game dict, scene) or None."""
    rng = random.Random("%s-%d" % (split, seed))
    task_type = task_type or TASK_TYPES[(seed - 1) % len(TASK_TYPES)]
    scene = sample_scene(rng, task_type, cfg)
    if scene is None:
        return None
    trial = "trial_G%06d_%s" % (seed, split)
    folder = "%s-%s-None-%s-%d" % (task_type, scene["obj"], scene["parent"] or scene["toggle"], scene["scene"])
    traj = traj_data(scene, trial)
    grammar = open(os.path.join(DATA_DIR, "alfred.twl2")).read()
    state = random.getstate()  # get_templated_task_desc draws from the global `random`: seed it, then restore
    random.seed("%s-%d-desc" % (split, seed))
    grammar = add_task_to_grammar(grammar, traj, rng=random.Random(seed))
    random.setstate(state)
    task_desc = grammar.split("Your task is to: ", 1)[1].split('."', 1)[0]
    traj["turk_annotations"]["anns"] = [dict(task_desc=task_desc, high_descs=[], votes=[1, 1, 1])]
    game = dict(pddl_domain=open(os.path.join(DATA_DIR, "alfred.pddl")).read(), grammar=grammar,
                pddl_problem=pddl_problem(scene, rng, "plan_" + trial), solvable=False, walkthrough=[])
    return os.path.join(folder, trial), traj, game, scene


def check_game(env, path, max_plan_len):
    """Play the planner's plan on the real engine (`env` from `envs.alfworld_tw.load_tw_env`).
    Returns the plan if the game loads, is not won at reset, is solved in <= max_plan_len steps; else None."""
    try:
        env.load(path)
        state = env.reset()
        plan = list(state["extra.expert_plan"])
        if state["won"] or not plan or len(plan) > max_plan_len:
            return None
        for cmd in plan:
            if cmd not in state["admissible_commands"]:
                return None
            state, _, _ = env.step(cmd)
        return plan if state["won"] else None
    except Exception:  # e.g. a goal the domain cannot express crashes at load
        return None


def generate(root, split, n_games, cfg=GenConfig(), avoid=(), verbose=False):
    """Write `n_games` checked games for `split` under `root/json_2.1.1/<folder>/`; returns their paths.

    Game i uses generator seeds i, i+n, ... of task type `TASK_TYPES[i % 6]` until one passes the
    checks, so every task type gets n_games/6 games. `avoid` is a set of scene signatures to skip
    (the other splits' pools, so that held-out scenes are new)."""
    env = load_tw_env()
    base = os.path.join(root, "json_2.1.1", SPLIT_DIRS.get(split, split))
    paths, seed = [], 0
    counts = {t: 0 for t in TASK_TYPES}
    want = {t: n_games // 6 + (1 if i < n_games % 6 else 0) for i, t in enumerate(TASK_TYPES)}
    while len(paths) < n_games:
        task_type = TASK_TYPES[seed % 6]
        seed += 1
        if counts[task_type] >= want[task_type]:
            continue
        made = make_game(seed, split, cfg, task_type)
        if made is None or signature(made[3]) in avoid:
            continue
        rel, traj, game, _ = made
        folder = os.path.join(base, rel)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "game.tw-pddl")
        json.dump(traj, open(os.path.join(folder, "traj_data.json"), "w"), indent=2)
        json.dump(game, open(path, "w"))
        plan = check_game(env, path, cfg.max_plan_len)
        if plan is None:  # unsolvable, already won or too long: remove and draw again
            os.remove(path)
            os.remove(os.path.join(folder, "traj_data.json"))
            os.rmdir(folder)
            continue
        game.update(solvable=True, walkthrough=plan)
        json.dump(game, open(path, "w"))
        counts[task_type] += 1
        paths.append(path)
        if verbose:
            print(len(paths), rel, plan)
    return paths


def pool_signatures(split, n_games, cfg, n_seeds=None):
    """Signatures of every scene the generator may draw for a `split` pool of `n_games` (pure Python)."""
    sigs = set()
    for seed in range(1, n_seeds or 20 * n_games + 100):
        made_rng = random.Random("%s-%d" % (split, seed))
        scene = sample_scene(made_rng, TASK_TYPES[(seed - 1) % 6], cfg)
        if scene is not None:
            sigs.add(signature(scene))
    return sigs


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--n_games", type=int, default=12)
    a = p.parse_args()
    generate(a.root, a.split, a.n_games, verbose=True)
