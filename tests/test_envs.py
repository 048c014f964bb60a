"""Environment protocol checks: expert wins, robustness to bad responses, determinism, splits, plugins.

ALFWorld games are generated on first use into the default cache ($STEPPO_CACHE or ~/.cache/steppo);
the expert check plays the default train pool (60 games, 10 per task type).
"""
import collections
import json
import os
import random
import re
import shutil

import pytest

import envs
from envs import alfworld_gen

BAD_RESPONSES = ["", "   ", "go to desk 1", "<action></action>", "<action>fly to the moon</action>",
                 "<action>go to desk 1", "x" * 10_000, "<action>" + "y" * 10_000 + "</action>",
                 "<action>去 柜子 1 ✓ — ünïcödé</action>", "\x00\udcff<action>\t</action>", "search[foo]",
                 "<action>search[]</action>", "<ACTION>answer</ACTION>"]


def play_expert(env, seed):
    obs, info = env.reset(seed)
    done, steps = False, 0
    while not done:
        assert info["expert"] is not None
        obs, reward, done, info = env.step(info["expert"])
        steps += 1
    return info, reward, steps


@pytest.fixture(scope="module")
def alfworld_train():
    return envs.make("alfworld", split="train")


@pytest.fixture(scope="module")
def small_pools(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("alfw"))
    return (envs.make("alfworld", split="train", n_games=12, cache_dir=cache),
            envs.make("alfworld", split="eval", n_games=12, cache_dir=cache), cache,
            envs.make("alfworld", split="valid", n_games=12, cache_dir=cache))


# ---------------------------------------------------------------------------------------------
# ALFWorld
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_alfworld_expert_wins_each_task_type(alfworld_train):
    env = alfworld_train
    wins, counts = collections.Counter(), collections.Counter()
    for seed in range(len(env)):
        info, reward, steps = play_expert(env, seed)
        task_type = info["task_id"].split("/")[2].split("-")[0]
        counts[task_type] += 1
        wins[task_type] += info["won"]
        assert info["won"] == (reward == 1.0) and steps <= env.max_steps
    assert set(counts) == set(alfworld_gen.TASK_TYPES) and min(counts.values()) >= 10
    for t in counts:
        assert wins[t] >= 0.95 * counts[t], (t, wins[t], counts[t])


def test_alfworld_bad_responses_are_invalid(small_pools):
    env = small_pools[0]
    obs, info = env.reset(3)
    assert env.max_steps >= len(BAD_RESPONSES) + 1
    for bad in BAD_RESPONSES:
        obs, reward, done, info = env.step(bad)
        assert info["invalid"] and not done and reward == 0.0
        assert "<action>" in obs and "Admissible actions:" in obs and info["admissible"]
        assert info["expert"].startswith("<action>") and set(info) >= {"task_id", "won", "admissible", "prompt"}
    # thinking before the tag is fine; the last block counts; case and spacing are forgiven
    action = info["admissible"][0]
    obs, reward, done, info = env.step("Let me think. <action>nope</action> Better: <ACTION>  %s </ACTION>" % action.upper())
    assert not info["invalid"] and info["action"] == action


def test_alfworld_invalid_penalty_and_truncation(small_pools, tmp_path):
    env = envs.make("alfworld", n_games=12, cache_dir=small_pools[2], max_steps=3, invalid_penalty=0.1)
    env.reset(0)
    for i in range(3):
        obs, reward, done, info = env.step("nonsense")
        assert reward == -0.1 and done == (i == 2)
    assert info["truncated"] and not info["won"] and info["expert"] is None
    with pytest.raises(RuntimeError):
        env.step("<action>look</action>")


def test_alfworld_expert_slip(small_pools):
    """expert_slip=p: in a seeded fraction p of episodes the expert stops one action short of the goal and looks
    around until the step limit (it loses); the default 0 is the planner as shipped."""
    cache = small_pools[2]
    always = envs.make("alfworld", n_games=12, cache_dir=cache, max_steps=15, expert_slip=1.0)
    half = envs.make("alfworld", n_games=12, cache_dir=cache, max_steps=15, expert_slip=0.5)
    for seed in range(3):
        info, reward, steps = play_expert(always, seed)
        assert not info["won"] and info["truncated"] and always.trace[-1][0] == "look"
        assert not info["invalid"]  # "look" is always admissible
        assert play_expert(small_pools[0], seed)[0]["won"]  # same game, default expert: won

    def slips(env):
        return [env.reset(seed) and env.slip for seed in range(40)]
    assert 10 <= sum(slips(half)) <= 30
    assert slips(envs.make("alfworld", n_games=12, cache_dir=cache, expert_slip=0.5)) == slips(half)  # from the seed
    for seed in range(4):
        assert play_expert(half, seed)[0]["won"] == (not half.slip)  # play_expert resets: half.slip is this seed's
    with pytest.raises(ValueError, match="expert_slip"):
        envs.make("alfworld", n_games=12, cache_dir=cache, expert_slip=-0.1)


def test_alfworld_handcoded_expert(small_pools, monkeypatch):
    """expert="handcoded": ALFWorld's rule-based agent, which looks for objects from what it has seen (the planner
    knows where everything is). It wins most games, slips by the planner's count, and plays on after actions it
    did not choose."""
    cache = small_pools[2]
    hc = envs.make("alfworld", n_games=12, cache_dir=cache, max_steps=15, expert="handcoded")
    assert hc.reset(0)[1]["expert"] == "<action>look</action>"  # it looks around first
    assert sum(play_expert(hc, seed)[0]["won"] for seed in range(6)) >= 4  # one game of each task type
    always = envs.make("alfworld", n_games=12, cache_dir=cache, max_steps=15, expert="handcoded", expert_slip=1.0)
    for seed in range(2):
        info, _, steps = play_expert(always, seed)
        assert not info["won"] and steps == 15 and always.trace[-1][0] == "look"
    rng, won = random.Random(0), 0
    for seed in range(6):  # three random admissible actions, then the expert takes over
        obs, info = hc.reset(seed)
        for t in range(15):
            act = rng.choice(info["admissible"]) if t < 3 else info["expert"][len("<action>"):-len("</action>")]
            obs, _, done, info = hc.step("<action>%s</action>" % act)
            if done:
                break
        won += info["won"]
    assert won >= 3
    from alfworld.agents.expert import HandCodedAgentFailed, HandCodedTWAgent

    def give_up(*args, **kwargs):  # what it raises when its subgoals are done and the goal is not
        raise HandCodedAgentFailed()
    monkeypatch.setattr(HandCodedTWAgent, "act", give_up)
    hc.reset(0)
    obs, _, done, info = hc.step("<action>look</action>")
    assert info["expert"] is None and not done and "Admissible actions:" in obs  # no expert action, no crash
    with pytest.raises(ValueError, match="expert must be"):
        envs.make("alfworld", n_games=12, cache_dir=cache, expert="oracle")


def test_alfworld_determinism(small_pools):
    train = small_pools[0]
    again = envs.make("alfworld", split="train", n_games=12, cache_dir=small_pools[2])
    for seed in [0, 5, 12 + 5]:  # seed 17 plays game 17 % 12 = 5
        a, b = train.reset(seed), again.reset(seed)
        assert a[0] == b[0] and a[1]["task_id"] == b[1]["task_id"]
    assert train.reset(5)[1]["task_id"] == train.reset(17)[1]["task_id"]
    assert train.reset(5)[1]["task_id"] != train.reset(6)[1]["task_id"]


def test_alfworld_generator_is_deterministic(tmp_path):
    cfg = alfworld_gen.GenConfig()
    a = alfworld_gen.generate(str(tmp_path / "a"), "train", 6, cfg)
    b = alfworld_gen.generate(str(tmp_path / "b"), "train", 6, cfg)
    rel = lambda paths, root: [os.path.relpath(p, root) for p in paths]
    assert rel(a, tmp_path / "a") == rel(b, tmp_path / "b")
    for pa, pb in zip(a, b):
        assert open(pa).read() == open(pb).read()
        game = json.load(open(pa))
        assert set(game) >= {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"}
        assert game["solvable"] is True and game["walkthrough"] and "UNKNOWN GOAL" not in game["grammar"]
        traj = json.load(open(os.path.join(os.path.dirname(pa), "traj_data.json")))
        assert traj["task_type"] in alfworld_gen.TASK_TYPES
        for name, kind in re.findall(r"\(receptacleType (\S+) (SinkBasin|BathtubBasin)Type\)", game["pddl_problem"]):
            assert name.endswith("_bar_" + kind)  # ALFRED ids: Sink|x|y|z|SinkBasin
    assert {json.load(open(os.path.join(os.path.dirname(p), "traj_data.json")))["task_type"] for p in a} == \
        set(alfworld_gen.TASK_TYPES)


def test_alfworld_generator_never_targets_the_tool_receptacle():
    """As ALFRED's sampler: 'clean X and put it in the sink' is not a task (nor microwave/heat, fridge/cool)."""
    for task_type, (_, tool) in alfworld_gen.NEEDS.items():
        scenes = [alfworld_gen.sample_scene(random.Random(seed), task_type, alfworld_gen.GenConfig()) for seed in range(300)]
        assert all(sc is None or sc["parent"] != tool for sc in scenes)
        assert sum(sc is not None for sc in scenes) > 200


def scene_signatures(env, split):
    """What each game of a generated pool is, ignoring coordinates: rebuilt from the seed in its trial name."""
    sigs = set()
    for g in env.games:
        trial_dir = os.path.dirname(g)
        seed = int(re.match(r"trial_G(\d+)_", os.path.basename(trial_dir)).group(1))
        task_type = os.path.basename(os.path.dirname(trial_dir)).split("-")[0]
        sigs.add(alfworld_gen.signature(alfworld_gen.make_game(seed, split, alfworld_gen.GenConfig(), task_type)[3]))
    return sigs


def test_alfworld_splits_disjoint(small_pools):
    train, evals, _, valid = small_pools
    sigs = {s: scene_signatures(env, s) for s, env in [("train", train), ("eval", evals), ("valid", valid)]}
    assert [len(sigs[s]) for s in sigs] == [12, 12, 12]  # and no task twice within a pool
    cfg = alfworld_gen.GenConfig()
    assert not sigs["eval"] & alfworld_gen.pool_signatures("train", 12, cfg)  # nor any the train generator could
    assert not sigs["valid"] & (alfworld_gen.pool_signatures("train", 12, cfg)  # draw; valid (for choosing
                                | alfworld_gen.pool_signatures("eval", 12, cfg))  # settings) misses eval's too
    tid = lambda env: {env.reset(s)[1]["task_id"] for s in range(len(env))}
    assert not tid(train) & tid(evals) and not tid(valid) & (tid(train) | tid(evals))
    assert all(t.startswith("json_2.1.1/valid_unseen/") for t in tid(evals))
    assert all(t.startswith("json_2.1.1/valid_seen/") for t in tid(valid))


def test_alfworld_games_are_dealt_round_robin_over_task_types(small_pools):
    """An evaluation of the first k games (train.py plays seeds 0..k-1) mixes the task types, even on a pool of
    hundreds whose sorted paths start with dozens of look_at_obj_in_light games."""
    train = small_pools[0]
    types = [os.path.relpath(g, train.data_dir).split("/")[2].split("-")[0] for g in train.games]
    assert sorted(types[:6]) == sorted(types[6:]) == sorted(alfworld_gen.TASK_TYPES)


def test_alfworld_memoised_templates_play_the_same_text(small_pools, monkeypatch):
    """envs/alfworld_tw.py memoises TextWorld's template parser; TextWorld's own parser gives the same observations."""
    from envs import alfworld_tw
    def play():
        env, texts = envs.make("alfworld", n_games=12, cache_dir=small_pools[2], max_steps=6), []
        for seed in range(3):
            obs, info = env.reset(seed)
            texts.append(obs)
            for t in range(6):  # the expert's actions, then an admissible non-expert one
                act = info["expert"] if t % 2 == 0 else "<action>%s</action>" % info["admissible"][-1]
                obs, _, done, info = env.step(act)
                texts.append(obs)
                if done:
                    break
        return texts
    fast = play()
    monkeypatch.setattr(alfworld_tw.pddl_textgen, "_parse_and_convert", alfworld_tw._parse_cached.__wrapped__)
    assert play() == fast


def test_alfworld_official_layout_loader(small_pools):
    """The generated folder loads as official data (data_dir=) and through AlfredTWEnv's own collector."""
    train, _, cache, _ = small_pools
    official = envs.make("alfworld", split="train", data_dir=train.data_dir)
    assert official.games == train.games
    obs, info = official.reset(1)
    assert info["task_id"] == os.path.relpath(official.games[1], train.data_dir)
    assert info["task_id"].endswith("/game.tw-pddl") and "Your task is to:" in obs
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv
    config = {"env": {"goal_desc_human_anns_prob": 0, "task_types": [1, 2, 3, 4, 5, 6]},
              "dataset": {"data_path": os.path.join(train.data_dir, "json_2.1.1", "train"), "num_train_games": -1}}
    assert sorted(AlfredTWEnv(config, "train").game_files) == sorted(train.games)
    with pytest.raises(ValueError, match="no ALFWorld games"):
        envs.make("alfworld", data_dir=cache + "/nothing-here")


def test_a_garbage_alfworld_game_file_is_an_error_naming_the_file_and_field(small_pools, tmp_path):
    train = small_pools[0]
    copy = tmp_path / "data"
    shutil.copytree(train.data_dir, copy)
    env = envs.make("alfworld", split="train", data_dir=str(copy))
    with open(env.games[0]) as f:
        game = json.load(f)
    for garbage, says in (("{not json", "JSONDecodeError"), (json.dumps({k: v for k, v in game.items() if k != "grammar"}),
                                                             "no field 'grammar'")):
        with open(env.games[0], "w") as f:
            f.write(garbage)
        with pytest.raises(ValueError, match=rf"alfworld: game file .*game.tw-pddl is not a TextWorld PDDL game .*{says}"):
            env.reset(0)


def test_alfworld_named_data_folder_never_falls_back_to_generated_games(small_pools, tmp_path, monkeypatch):
    train = small_pools[0]
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "typo"))  # a data folder the user named must exist
    with pytest.raises(ValueError, match="no ALFWorld games for split='train'"):
        envs.make("alfworld", split="train")
    half = tmp_path / "half"  # train copied, valid_unseen missing: eval must not silently use generated games
    (half / "json_2.1.1").mkdir(parents=True)
    os.symlink(os.path.join(train.data_dir, "json_2.1.1", "train"), half / "json_2.1.1" / "train")
    monkeypatch.setenv("ALFWORLD_DATA", str(half))
    assert envs.make("alfworld", split="train").games[0].startswith(str(half))
    with pytest.raises(ValueError, match="split='eval'"):
        envs.make("alfworld", split="eval")
    with pytest.raises(ValueError, match="no ALFWorld games"):
        envs.make("alfworld", data_dir="")


def test_alfworld_prompt_window(small_pools):
    env = small_pools[0]
    obs, info = env.reset(2)
    assert "Your task is to:" in info["prompt"] and "admissible actions" in info["prompt"]
    for _ in range(4):
        obs, reward, done, info = env.step(info["expert"])
        if done:
            break
        assert "Prior to this step, you have already taken" in info["prompt"]
        assert info["prompt"].count("[Step ") <= env.history
    assert "<action>" in env.system_prompt


# ---------------------------------------------------------------------------------------------
# Multi-hop QA
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "valid", "eval"])
def test_multihop_expert_wins_every_task(split):
    env = envs.make("multihop", split=split, expert_slip=0.0)  # the default expert is impatient (slip 0.7)
    hops = collections.Counter()
    for seed in range(len(env)):
        info, reward, steps = play_expert(env, seed)
        assert info["won"] and reward == 1.0 and 3 <= steps <= 5
        hops[steps - 1] += 1
    assert set(hops) == {2, 3, 4}


def test_multihop_expert_slip():
    """expert_slip=p: in a seeded fraction p of episodes the expert answers one hop early (and loses); default 0.7."""
    always, half = envs.make("multihop", expert_slip=1.0), envs.make("multihop", expert_slip=0.5)
    lost = []
    for seed in range(200):
        info, reward, steps = play_expert(always, seed)
        assert not info["won"] and reward == 0.0 and steps <= len(always.path) - 1  # a search fewer
        assert always.trace[-1][0] == "answer[%s]" % always.path[-2]  # the last entity it found
        info, _, _ = play_expert(half, seed)
        lost.append(not info["won"])
        again = envs.make("multihop", expert_slip=0.5)
        again.reset(seed)
        assert again.slip == half.slip == lost[-1]  # drawn from the seed
    assert 0.4 < sum(lost) / len(lost) < 0.6
    default = envs.make("multihop")
    assert 0.6 < sum(play_expert(default, seed)[1] == 0.0 for seed in range(200)) / 200 < 0.8
    with pytest.raises(ValueError, match="expert_slip"):
        envs.make("multihop", expert_slip=1.5)


def test_multihop_bad_responses_and_answers():
    env = envs.make("multihop", max_steps=len(BAD_RESPONSES) + 2)
    obs, info = env.reset(7)
    for bad in BAD_RESPONSES:
        obs, reward, done, info = env.step(bad)
        assert info["invalid"] and not done and reward == 0.0 and "<action>" in obs
    obs, reward, done, info = env.step("<action>search[Nobody At All]</action>")
    assert not info["invalid"] and obs.startswith("No result")
    obs, reward, done, info = env.step("<action>answer[definitely wrong]</action>")
    assert done and reward == 0.0 and not info["won"] and info["expert"] is None
    with pytest.raises(RuntimeError):
        env.step("<action>answer[x]</action>")
    # normalised exact match: case, punctuation and articles do not matter
    env.reset(7)
    obs, reward, done, info = env.step("I know it. <action>answer[ THE %s! ]</action>" % env.gold.upper())
    assert reward == 1.0 and info["won"]


def test_multihop_determinism_and_splits():
    a, b = envs.make("multihop"), envs.make("multihop")
    assert [a.reset(s) for s in range(5)] == [b.reset(s) for s in range(5)]
    ev, va = envs.make("multihop", split="eval"), envs.make("multihop", split="valid")
    for x, y in ((a, ev), (a, va), (va, ev)):
        assert not set(map(str, x.tasks)) & set(map(str, y.tasks))
        assert not {x.reset(s)[1]["task_id"] for s in range(len(x))} & {y.reset(s)[1]["task_id"] for s in range(len(y))}
    assert (len(a), len(va), len(ev)) == (93, 18, 37)


def test_multihop_per_task_worlds():
    """worlds="per_task": every task seed draws its own knowledge base, so a policy must read the fact cards; the
    same seed gives the same world and question, train and eval never share a world, and the expert wins."""
    kw = dict(worlds="per_task", expert_slip=0.0)  # an expert that always wins
    tr, ev, va = (envs.make("multihop", split=split, **kw) for split in ("train", "eval", "valid"))
    again = envs.make("multihop", **kw)
    kbs = set()
    for seed in range(40):
        for env in (tr, ev, va):
            info, reward, _ = play_expert(env, seed)
            assert info["won"] and reward == 1.0
            kbs.add((env.split, str(sorted(env.kb.items()))))
        assert tr.reset(seed) == again.reset(seed) and tr.kb == again.kb
    train_worlds = {k for split, k in kbs if split == "train"}
    assert len(train_worlds) == 40 and not train_worlds & {k for split, k in kbs if split != "train"}
    with pytest.raises(ValueError, match="worlds"):
        envs.make("multihop", worlds="mixed")


# ---------------------------------------------------------------------------------------------
# Registry and plugins
# ---------------------------------------------------------------------------------------------
PLUGIN = '''
class CountEnv:
    """Say the next number."""
    system_prompt = "Count up. Reply <action>N</action>."
    def __init__(self, split="train", start=0):
        self.start, self.max_steps = start, 3
    def reset(self, seed):
        self.n = self.start + seed
        return str(self.n), dict(task_id=str(seed), won=False, invalid=False, admissible=None, expert="<action>%d</action>" % (self.n + 1))
'''


def test_plugin_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_env.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = envs.make("my_plugin_env:CountEnv", start=10)
    assert type(env).__name__ == "CountEnv" and env.reset(2)[0] == "12"
    with pytest.raises(ValueError, match="alfworld, hotpotqa, multihop"):
        envs.make("no_such_env")
    with pytest.raises(ValueError, match="cannot load"):
        envs.make("my_plugin_env:Missing")
    for spec in (":CountEnv", "my_plugin_env:", "os.path:join"):  # no module, no class, not a class
        with pytest.raises(ValueError, match="cannot load"):
            envs.make(spec)
    for name in ("alfworld", "multihop", "hotpotqa"):
        with pytest.raises(ValueError, match="split must be"):
            envs.make(name, split="test")


def test_bench_failures_sorts_each_outcome():
    """bench/bench_failures.py's outcome(): one hand-made episode per kind of failure, on a 3-hop question."""
    import importlib.util
    from step_mdp import Step, Trajectory
    spec = importlib.util.spec_from_file_location("bench_failures", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_failures.py"))
    bf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bf)
    env = envs.make("multihop")
    seed = next(s for s in range(len(env)) if env.reset(s) and len(env.path) == 4)  # e0 -> e1 -> e2 -> answer e3
    p = env.path
    other = next(n for n in env.kb if n not in p)
    act = lambda tool, arg: "<action>%s[%s]</action>" % (tool, arg)
    episode = lambda *texts, won=False: Trajectory([Step([], [], [], action_text=t) for t in texts], "t", True, won)
    right = [act("search", p[0]), act("search", p[1]), act("search", p[2])]
    cases = {"won": episode(*right, act("answer", p[3]), won=True),
             "invalid": episode(act("search", p[0]), "I think so", act("answer", p[3])),
             "no answer": episode(*right, act("search", p[3])),
             "wrong first search": episode(act("search", other), act("answer", p[3])),
             "off the chain (hop >= 2)": episode(act("search", p[0]), act("search", other), act("answer", p[3])),
             "answered early": episode(*right[:2], act("answer", p[2])),
             "searched past the chain": episode(*right, act("search", p[3]), act("answer", other)),
             "right searches, wrong answer": episode(*right, act("answer", other))}
    assert set(cases) == set(bf.OUTCOMES)
    for want, traj in cases.items():
        env.reset(seed)
        assert bf.outcome(env, traj) == want, want
