"""WebShop (envs/webshop.py): the official files' parsing and goals, search, the official reward, text-mode pages and
actions, the expert, and train.py end to end on the offline sample."""
import json
import os
import subprocess
import sys

import pytest

import envs
from envs import webshop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("webshop")
    sizes = webshop.make_sample(str(folder))
    return str(folder), sizes, str(tmp_path_factory.mktemp("webshop-cache"))


def make(sample, split="train", **kw):
    folder, _, cache = sample
    return envs.make("webshop", split=split, data_dir=folder, cache_dir=cache, **kw)


def write(folder, products, attributes, human):
    os.makedirs(folder, exist_ok=True)
    for key, data in (("products", products), ("attributes", attributes), ("human", human)):
        with open(os.path.join(folder, webshop.FILES[key]), "w") as f:
            json.dump(data, f)
    return str(folder)


def product(asin, name="Acme Soap Bar", pricing="$3.50", options=None, **kw):
    return {"asin": asin, "name": name, "full_description": "A soap.", "small_description": ["Gentle soap"],
            "category": "beauty", "query": "Soap ", "product_category": "Beauty › Bath › Soap", "pricing": pricing,
            "images": ["x.jpg"], "customization_options": options, "brand": "Acme", **kw}


def test_the_loader_parses_the_official_schema_as_the_official_code(tmp_path):
    options = {"Color": [{"value": " Black/White ", "image": None}, {"value": "Red", "image": "r.jpg"}], "Size": None}
    folder = write(tmp_path, [product("B01", options=options), product("nan"), product("B0123456789"),
                              product("B01", name="a repeat"), product("B02", pricing="$10.99 - $24.99"),
                              product("B03", pricing="")],
                   {"B01": {"attributes": ["gentle", "natural"], "instruction": "i want a gentle soap",
                            "instruction_attributes": ["gentle"]}},
                   {"B02": [{"instruction": "a soap bar.", "instruction_attributes": ["natural"],
                             "instruction_options": ["red"]},
                            {"instruction": "anything", "instruction_attributes": [], "instruction_options": []}]})
    products = webshop.load_products(folder)
    assert [p["asin"] for p in products] == ["B01", "B02", "B03"]  # "nan", > 10 characters, repeats: skipped
    b01, b02, b03 = products
    assert b01["options"] == {"color": ["black | white", "red"]}  # stripped, "/" -> " | ", lower case; None dropped
    assert b01["Attributes"] == ["gentle", "natural"] and b02["Attributes"] == ["DUMMY_ATTR"]
    assert (b01["pricing"], b01["Price"]) == ([3.5], "$3.5")  # the official f"${price}"
    assert (b02["pricing"], b02["Price"]) == ([10.99, 24.99], "$10.99 to $24.99")
    assert b03["pricing"] == [100.0] and b01["query"] == "soap" and "brand" not in b01
    assert b01["Title"] == "Acme Soap Bar" and b01["BulletPoints"] == ["Gentle soap"]
    synthetic, prices = webshop.make_goals(products, "synthetic", webshop.random.Random(233))
    assert [g["instruction_text"].split(", and price")[0] for g in synthetic] == \
        ["i want a gentle soap with color: black | white", "i want a gentle soap with color: red"]  # one per option
    assert synthetic[0]["goal_options"] == {"color": "black | white"} and synthetic[0]["attributes"] == ["gentle"]
    assert 10.99 <= prices["B02"] <= 24.99 and prices["B01"] == 3.5  # a range: one uniform draw
    for g in synthetic:  # the bound: the larger of two of the four grid values above the price
        assert g["price_upper"] in (20.0, 30.0, 40.0) and g["instruction_text"].endswith(
            ", and price lower than %.2f dollars" % g["price_upper"])
    human, _ = webshop.make_goals(products, "human", webshop.random.Random(233))
    assert len(human) == 1 and human[0]["goal_options"] == ["red"]  # the record without attributes is skipped
    assert human[0]["instruction_text"].startswith("a soap bar, and price lower than")  # the "." stripped


@pytest.mark.parametrize("damage, message", [
    (lambda f: os.remove(os.path.join(f, webshop.FILES["human"])), "items_human_ins.json does not exist"),
    (lambda f: open(os.path.join(f, webshop.FILES["products"]), "w").write("[{"), "cannot be read as JSON"),
    (lambda f: open(os.path.join(f, webshop.FILES["products"]), "w").write('{"a": 1}'), "is not a JSON list"),
    (lambda f: open(os.path.join(f, webshop.FILES["products"]), "w").write('[{"asin": "B1"}]'), "product 0 lacks"),
    (lambda f: open(os.path.join(f, webshop.FILES["products"]), "w").write(json.dumps([product("B01", options=["red"])])),
     "product B01 field customization_options is a list, not an object"),
])
def test_a_missing_or_broken_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, damage, message):
    folder = write(tmp_path / "d", [product("B01")], {}, {})
    damage(folder)
    with pytest.raises(ValueError, match=message) as e:
        envs.make("webshop", data_dir=folder, cache_dir=str(tmp_path / "cache"))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delenv("WEBSHOP_DATA", raising=False)
    with pytest.raises(ValueError, match="WEBSHOP_DATA"):  # no folder at all: how to get the files
        webshop.data_folder(None)


def test_splits_are_disjoint_fixed_and_never_empty(sample, tmp_path):
    goals = {s: [g["instruction_text"] + g["asin"] for g in make(sample, s).goals] for s in ("train", "valid", "eval")}
    assert all(goals.values()) and len(set(goals["train"]) & set(goals["eval"])) == 0
    assert len(set(goals["valid"]) & (set(goals["train"]) | set(goals["eval"]))) == 0
    n = sample[1]["synthetic goals"]
    assert len(goals["eval"]) == len(goals["valid"]) == min(200, n // 10) and sum(map(len, goals.values())) == n
    assert [g["asin"] for g in make(sample, "eval").goals] == [g["asin"] for g in make(sample, "eval").goals]
    folder = write(tmp_path / "small", [product("B01", options={"c": [{"value": v} for v in "xyz"]})],
                   {"B01": {"attributes": ["a"], "instruction": "i want soap", "instruction_attributes": ["a"]}}, {})
    small = [envs.make("webshop", split=s, data_dir=folder, cache_dir=str(tmp_path / "c")) for s in ("train", "valid", "eval")]
    assert [len(e) for e in small] == [1, 1, 1]  # three goals: one per split


def test_search_ranks_each_product_first_for_its_own_title(sample):
    env = make(sample)
    assert all(env.search(p["Title"].lower())[0] == p["asin"] for p in env.products[::7])
    assert len(env.search("cable")) <= webshop.SEARCH_RETURN_N and env.search("the and of") == []


def test_the_reward_on_a_hand_worked_example():
    """2 goal attributes (one a fuzzy attribute match, one found in the description), 2 options (one chosen
    right), price within the bound: (2 + 1 + 1) / (2 + 2 + 1) = 0.8, r_type 1 (same query)."""
    p = {"Title": "Acme Gentle Soap Bar", "BulletPoints": ["for dry skin"], "Description": "Made with shea butter.",
         "Attributes": ["paraben-free"], "query": "soap", "product_category": "Beauty › Bath › Soap"}
    goal = {"attributes": ["paraben free", "shea butter"], "goal_options": {"scent": "lavender", "size": "large"},
            "price_upper": 20.0, "query": "soap", "product_category": "Beauty › Bath › Soap", "name": "Acme Gentle Soap Bar"}
    assert webshop.get_reward(p, goal, 12.0, {"scent": "lavender", "size": "small"}) == pytest.approx(0.8)
    assert webshop.get_reward(p, goal, 12.0, {"scent": "lavender", "size": "large"}) == 1.0
    assert webshop.get_reward(p, goal, 25.0, {"scent": "lavender", "size": "large"}) == pytest.approx(0.8)  # price
    other = dict(p, Title="Zed Garden Hose Pipe", query="hose", product_category="Garden › Hoses › Hose")
    assert webshop.type_reward(other, goal) == 0.0  # no shared title word: r_type 0
    half = dict(other, Title="Zed Soap Dish")  # 1 of 4 title words ("acme gentle soap bar"), no query or category
    assert webshop.type_reward(half, goal) == 1.0  # 0.25 > 0.2 (the official threshold)
    fifth = dict(other, Title="Zed Bar Stool")
    assert webshop.type_reward(fifth, dict(goal, name="acme gentle soap bar stand fixture")) == 0.5  # 1/6: r_type 0.5


def test_the_target_with_the_goals_options_scores_1_a_wrong_option_less_a_wrong_product_less_still(sample):
    env = make(sample, "eval")
    found = [(g, n, v) for g in env.goals for n in g["goal_options"] for v in env.by_asin[g["asin"]]["options"][n]
             if webshop.fuzzy(v, g["goal_options"][n]) < 60 and webshop.normalize_color(v) != v]  # another colour
    assert found
    goal, name, value = found[0]
    target, right = env.by_asin[goal["asin"]], dict(goal["goal_options"])
    wrong = dict(right, **{name: value})
    price = env.prices[goal["asin"]]
    assert webshop.get_reward(target, goal, price, right) == 1.0
    r_wrong = webshop.get_reward(target, goal, price, wrong)
    other = next(p for p in env.products if p["category"] != target["category"])
    r_other = webshop.get_reward(other, goal, env.prices[other["asin"]], {})
    assert r_other < r_wrong < 1.0
    assert webshop.get_reward(target, dict(goal, price_upper=price - 0.01), price, right) < 1.0  # over the bound


def play(env, actions):
    out = []
    for a in actions:
        out.append(env.step(a))
    return out


def test_pages_and_clickables_follow_the_official_text_mode(sample):
    env = make(sample)
    obs, info = env.reset(0)
    assert obs.startswith("WebShop [SEP] Instruction: [SEP] ") and info["admissible"] == ["search[<your query>]"]
    kind = env.by_asin[env.goal["asin"]]["query"]
    obs, r, done, info = env.step("<action>search[%s]</action>" % kind.upper())  # lower-cased, as the official env
    assert "Page 1 (Total results: " in obs and "< Prev" not in obs and "click[next >]" in info["admissible"]
    assert r == 0 and not done and not info["invalid"] and env.page == "results"
    first = env.page_asins()[0]
    obs, *_ , info = env.step("click[next >]")  # a bare action works too
    assert "Page 2" in obs and "click[< prev]" in info["admissible"] and first.lower() not in obs.lower()
    obs, *_, info = env.step("<action>click[< prev]</action>")
    obs, *_, info = env.step("<action>click[%s]</action>" % first.lower())
    p = env.by_asin[first]
    assert env.page == "item" and "Buy Now" in obs and p["Title"] in obs
    assert set(info["admissible"]) >= {"click[buy now]", "click[description]", "click[< prev]", "click[back to search]"}
    obs, *_, info = env.step("<action>click[features]</action>")
    assert p["BulletPoints"][0] in obs and env.page == "sub"
    obs, *_, info = env.step("<action>click[< prev]</action>")
    assert env.page == "item"
    obs, *_, info = env.step("<action>click[back to search]</action>")
    assert env.page == "search" and info["admissible"] == ["search[<your query>]"]


@pytest.mark.parametrize("bad", ["", "buy it", "<action>click[not a button]</action>", "<action>search[]</action>",
                                 "<action>search[" + "x" * 10_000 + "]</action>", "買い物", "<action>search[東京]</action>",
                                 "<action>click[buy now]</action>", "<action>jump[results]</action>"])
def test_bad_actions_are_invalid_steps_that_change_nothing(sample, bad):
    env = make(sample, invalid_penalty=0.1)
    obs, info = env.reset(5)
    obs2, r, done, info2 = env.step(bad)
    assert info2["invalid"] and r == -0.1 and not done and obs2 == obs and env.page == "search"
    env.step("<action>search[cable]</action>")  # on the results page: search has no bar here
    before = env.observation()
    obs3, r, done, info3 = env.step("<action>search[soap]</action>")
    assert info3["invalid"] and obs3 == before and not done


def test_the_expert_wins_every_sample_goal_and_pages_when_it_must(sample):
    for goals in ("synthetic", "human"):
        for split in ("train", "valid", "eval"):
            env = make(sample, split, goals=goals)
            for s in range(len(env)):
                obs, info = env.reset(s)
                done = False
                while not done:
                    obs, r, done, info = env.step(info["expert"])
                assert info["won"] and r == 1.0 and info["score"] == 100.0 and env.t <= 6, (goals, split, s)
    env = make(sample)
    obs, info = env.reset(3)
    obs, r, done, info = env.step(info["expert"])
    target = env.goal["asin"]
    env.results = [a for a in env.results if a != target][:12] + [target]  # the target on page 2
    assert env._expert() == "<action>click[next >]</action>"
    env.step(env._expert())
    assert env._expert() == "<action>click[%s]</action>" % target.lower()
    env.results = [a for a in env.results if a != target]  # not found at all: back to search, then its own title
    assert env._expert() == "<action>click[back to search]</action>"
    obs, r, done, info = env.step(env._expert())
    assert info["expert"] == "<action>search[%s]</action>" % " ".join(env.by_asin[target]["Title"].lower().split())


def test_the_step_limit_cuts_and_the_window_prompt_stays_bounded(sample):
    env = make(sample, max_steps=3, page_chars=200, history=2)
    obs, info = env.reset(1)
    for _ in range(3):
        obs, r, done, info = env.step("<action>search[cable]</action>" if env.page == "search" else "click[next >]")
    assert done and info["truncated"] and r == 0.0 and not info["won"]
    assert len(info["prompt"]) < 200 + len(env.goal["instruction_text"]) + 2 * len(" ".join(info["admissible"])) + 200
    assert "Last actions: click[next >]; click[next >]" in info["prompt"]
    with pytest.raises(RuntimeError):
        env.step("click[next >]")


def test_the_search_index_is_built_once_and_loaded_from_disk(sample, monkeypatch):
    from envs import hotpotqa
    make(sample)
    monkeypatch.setattr(hotpotqa, "_INDEXES", {})  # a new process: loads from disk, never rebuilds
    monkeypatch.setattr(hotpotqa, "build_corpus_index", lambda *a: pytest.fail("rebuilt a cached index"))
    env = make(sample)
    assert env.search(env.products[0]["Title"].lower())[0] == env.products[0]["asin"]


@pytest.mark.slow  # ~45-65 s on 2 cores (torchrun or a whole run): in CI's slow tier
def test_train_runs_on_the_webshop_sample_end_to_end(sample, tmp_path):
    folder = sample[0]
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--env", "webshop", "--env-kwargs", json.dumps({"data_dir": folder}),
                        "--iters", "1", "--envs-per-iter", "4", "--group-size", "2", "--sft-steps", "2",
                        "--sft-batch-size", "2", "--sft-episodes", "8", "--eval-episodes", "4", "--max-steps", "6",
                        "--max-new-tokens", "48", "--context", "window", "--micro-tokens", "8192", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "STEPPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["iter"] for row in rows] == [0, 1] and "score" in rows[0] and "eval_score" in rows[-1]
    assert 0 <= rows[0]["score"] <= 100 and "warm start: 2 steps on 8 expert episodes (8 won)" in r.stdout
