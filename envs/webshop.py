"""WebShop (Yao et al. 2022, arXiv 2207.01206; github princeton-nlp/WebShop, MIT) in one Python process: the
official data files, the official goals and reward, text-mode pages, BM25 search without Java or a server.

Data: the three files of the official 1000-product setting, in `data_dir=` or `$WEBSHOP_DATA` (FILES below; the
official setup.sh downloads them with `./setup.sh -d small`), parsed as the official `load_products` does
(web_agent_site/engine/engine.py): asins of over 10 characters, "nan" and repeats skipped; "$12.99" or
"$10.99 - $24.99" -> one or two prices (missing: $100.0); option values stripped, "/" -> " | ", lower-cased;
attributes from items_ins_v2 (none: ["DUMMY_ATTR"]). `python -m envs.webshop --make-sample DIR` writes an
invented offline catalogue in that schema (products over five categories, options, prices, attributes, synthetic
and human-style instructions) for tests and CPU runs.

Goals (`goals=`), as the official goal.py makes them: "synthetic" (default, the StepPO recipe's: 6,910 goals on
the real files), one per option combination of each product whose items_ins_v2 entry has an instruction,
"{instruction} with name: value, and ...", goal options {name: value}; "human": each items_human_ins record with
attributes, its instruction and its options (a list of values). Both append ", and price lower than X.XX dollars",
a bound drawn from the grid 10, 20, ..., 990 (two of the four grid values above the product's price, the larger
kept). Prices of ranged products are drawn uniformly from the range, once. The goals are shuffled with seed 233
(the official SimServer's `random.seed(233); random.shuffle`); then the last `held_out` goals are split "eval",
the `held_out` before them "valid" (for choosing settings), the rest "train": held_out = 200 (the StepPO
recipe's 200 test goals after 6,710 train goals) or a tenth of the goals when that is smaller (a small catalogue
still gets all three splits). Differences from the official code: its prices and bounds are drawn from the
unseeded global RNG (other numbers every run); ours from random.Random(233), the same every run.

Pages and actions, as the official text mode (web_agent_text_env.py, observation_mode="text": the visible strings
of a page joined by " [SEP] "): the search page (instruction, search bar) takes `search[keywords]`; results (10 of
the top 50 per page, "next >" on every page as the official template, "< prev" from page 2, "back to search");
the item page (each option's values, title, price, rating, "description", "features", "reviews", "buy now"); the
sub-pages ("< prev" returns to the item). `click[x]` for any clickable shown; the argument is lower-cased, as the
official env does. The response holds one action in a tag, `<action>click[buy now]</action>` (the last tag
counts; a bare `search[...]` / `click[...]` response works too). Each observation ends with the selected options
and the available actions; `info["admissible"]` lists them (search as `search[<your query>]`). Anything else (no
action, an unknown clickable, search where there is no search bar, an empty or over-500-character argument, a
query without a letter or digit) is an invalid step: no state change, reward `-invalid_penalty`, never an
exception. An episode ends at "buy now" or after `max_steps` (the authors' 15) turns, a cut (info["truncated"]).

Search: BM25 (bm25s; Lucene's variant, k1=1.5, b=0.75, English stop words, no stemming) over each product's
official search document (engine/convert_product_file_format.py: title, description, first bullet point and
"name: values" of its options, lower-cased), top 50 with a positive score as the official search returns 50.
Built once per data folder and cached on disk under `cache_dir=` (default $STEPPO_CACHE/webshop or
~/.cache/steppo/webshop), as envs/hotpotqa.py's corpus index. The official search is Lucene (pyserini) with its
English analyzer (Porter stemming): a query can rank products differently here.

Reward (goal.py, `get_reward`), on "buy now" only: R = r_type x (attributes matched + options matched + [price <=
bound]) / (goal attributes + goal options + 1). A goal attribute matches a product attribute at token-set ratio
> 85 (thefuzz, as the official code), else if it occurs in the title, bullet points or description; a goal option
matches a selected value at ratio > 85 after colour normalisation; r_type is 1, or 0.5 when neither query,
category (>= 2 shared levels) nor title nouns (> 20%) match, 0.1 below 10% of the nouns, 0 with none. The title's
nouns: the official code tags them with spaCy's en_core_web_sm, which is not on the package registry; our
stand-in (`nouns="words"`) takes every word of 3+ letters that is not a stop word, so titles that share
adjectives but no nouns score higher here (r_type 1 where spaCy may give 0.5 or 0.1); `nouns="spacy"`
uses spaCy where en_core_web_sm is installed. info["won"] = reward exactly 1 (success); info["score"] = 100 x
the reward (train.py logs its mean as `score`). `reward="success"` pays 1 for a success and 0 otherwise, as the
StepPO recipe trains (theirs pays 10; the whitened advantages do not see the scale).

The expert (info["expert"]): search the goal's instruction, page to the target product (its own title as the
query if the instruction does not find it), click it, choose the goal's options (the closest values), buy.
`window` context: info["prompt"] is a bounded state: instruction, page (at most `page_chars`), selected options,
the last `history` actions, the available actions. Defaults and their sources: docs/envs.md.
"""
import argparse
import itertools
import json
import os
import random
import re
from decimal import Decimal, InvalidOperation

from envs.hotpotqa import bm25_top, corpus_index
from envs.multihop import ACTION_RE  # <action>...</action>, the last block counts

FILES = {"products": "items_shuffle_1000.json", "attributes": "items_ins_v2_1000.json", "human": "items_human_ins.json"}
SCHEMA = {"products": 'a JSON list of products {"asin", "name", "full_description", "small_description", "category", '
                      '"query", "product_category", "pricing" ("$12.99" or "$10.99 - $24.99"), "images", '
                      '"customization_options" {name: [{"value", "image"}]}}',
          "attributes": 'a JSON object asin -> {"attributes": [str], optional "instruction": str, '
                        '"instruction_attributes": [str]}',
          "human": 'a JSON object asin -> [{"instruction": str, "instruction_attributes": [str], '
                   '"instruction_options": [str]}, ...]'}
HOW_TO_GET = ("the official repository's setup script downloads them (git clone https://github.com/princeton-nlp/"
              "WebShop; ./setup.sh -d small: data/%s, data/%s, data/%s); or write an offline sample in that schema: "
              "python -m envs.webshop --make-sample DIR" % (FILES["products"], FILES["attributes"], FILES["human"]))
PRICE_RANGE = [10.0 * i for i in range(1, 100)]  # goal.py
SEARCH_RETURN_N, PRODUCT_WINDOW = 50, 10  # engine.py
MAX_ARG = 500  # characters: a longer search or click argument is invalid
SUB_PAGES = ("description", "features", "reviews")
COLOR_SET = ["alabaster", "apricot", "aqua", "ash", "asphalt", "azure", "banana", "beige", "black", "blue", "blush",
             "bordeaux", "bronze", "brown", "burgundy", "camel", "camo", "caramel", "champagne", "charcoal", "cheetah",
             "chestnut", "chocolate", "christmas", "coffee", "cognac", "copper", "coral", "cranberry", "cream",
             "crystal", "dark", "denim", "eggplant", "elephant", "espresso", "fuchsia", "gold", "granite", "grape",
             "graphite", "grass", "gray", "green", "grey", "heather", "indigo", "ivory", "ivy", "khaki", "lavender",
             "lemon", "leopard", "light", "lilac", "lime", "magenta", "maroon", "mauve", "merlot", "midnight", "mint",
             "mocha", "multicolor", "mushroom", "mustard", "natural", "navy", "nude", "olive", "orange", "peach",
             "pewter", "pink", "plum", "purple", "rainbow", "red", "rose", "royal", "rust", "sand", "sapphire",
             "seashell", "silver", "skull", "slate", "steel", "stone", "stonewash", "sunflower", "tan", "taupe", "teal",
             "tiger", "turquoise", "violet", "walnut", "wheat", "white", "wine", "yellow"]  # engine/normalize.py
SYSTEM = ("You are shopping on WebShop, a text web shop. Find and buy the product that best matches the instruction, "
          "with the options it asks for, within its price. Each turn, write exactly one action inside an action tag: "
          "<action>search[keywords]</action> on the search page, or <action>click[x]</action> with x one of the "
          "available clickables (a product's ASIN, an option value, description, features, reviews, < prev, next >, "
          "back to search, buy now). Buying ends the episode. You may think briefly before the tag; only the last "
          "<action>...</action> block is executed.")
CALL_RE = re.compile(r"^\s*(search|click)\[(.*)\]\s*$", re.DOTALL | re.IGNORECASE)
_CATALOGUES = {}  # (folder, goals) -> (products, goals): every env of a process shares one parse


# ---------------------------------------------------------------- data: the official files (engine.py load_products)
def data_folder(data_dir):
    folder = data_dir if data_dir is not None else os.environ.get("WEBSHOP_DATA")
    if not folder:
        raise ValueError("webshop needs the official data files %s, %s and %s: pass data_dir (--env-kwargs "
                         "'{\"data_dir\": \"/path\"}') or set $WEBSHOP_DATA; %s"
                         % (FILES["products"], FILES["attributes"], FILES["human"], HOW_TO_GET))
    return folder


def read_json(folder, key, kind):
    path = os.path.join(folder, FILES[key])
    if not os.path.isfile(path):
        raise ValueError("webshop: %s does not exist (expected %s); %s" % (path, SCHEMA[key], HOW_TO_GET))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError("webshop: %s cannot be read as JSON (%s); expected %s" % (path, e, SCHEMA[key])) from None
    if not isinstance(data, kind) or (kind is list and not data):  # a catalogue without instructions is fine
        raise ValueError("webshop: %s is not %s" % (path, SCHEMA[key]))
    return data, path


def parse_pricing(text):
    """"$12.99" -> [12.99]; "$10.99 - $24.99" -> [10.99, 24.99]; missing -> [100.0] (engine.py)."""
    if not text:
        return [100.0]
    try:
        prices = [float(Decimal(re.sub(r"[^\d.]", "", p))) for p in str(text).split("$")[1:]]
    except InvalidOperation:
        prices = []
    return prices[:2] or [100.0]


def load_products(folder):
    """The products of the three files: dicts with the official loader's keys (asin, Title, Description,
    BulletPoints, pricing, Price, options, Attributes, category, query, product_category, instructions (human
    records), instruction_text and instruction_attributes (items_ins_v2))."""
    raw, path = read_json(folder, "products", list)
    attributes, _ = read_json(folder, "attributes", dict)
    human, _ = read_json(folder, "human", dict)
    products, seen = [], set()
    for i, p in enumerate(raw):
        need = ("asin", "name", "category", "query", "product_category")
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in need):
            raise ValueError("webshop: %s: product %d lacks one of %s (strings); expected %s"
                             % (path, i, ", ".join(need), SCHEMA["products"]))
        asin = p["asin"]
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        options, given = {}, p.get("customization_options") or {}
        if not isinstance(given, dict):
            raise ValueError("webshop: %s: product %s field customization_options is a %s, not an object {name: "
                             "[{\"value\", \"image\"}]}" % (path, asin, type(given).__name__))
        for name, contents in given.items():
            if contents is None:
                continue
            if not isinstance(contents, list) or not all(isinstance(c, dict) and isinstance(c.get("value"), str)
                                                         for c in contents):
                raise ValueError("webshop: %s: product %s option %r is not a list of {\"value\", \"image\"}"
                                 % (path, asin, name))
            options[name.lower()] = [c["value"].strip().replace("/", " | ").lower() for c in contents]
        pricing = parse_pricing(p.get("pricing"))
        bullets = p.get("small_description")
        entry = attributes.get(asin) if isinstance(attributes.get(asin), dict) else {}
        products.append({
            "asin": asin, "Title": p["name"], "Description": str(p.get("full_description") or ""),
            "BulletPoints": [str(b) for b in bullets] if isinstance(bullets, list) else [str(bullets or "")],
            "pricing": pricing, "Price": "$%s" % pricing[0] if len(pricing) == 1 else "$%s to $%s" % tuple(pricing),
            "options": options, "Attributes": list(entry.get("attributes") or ["DUMMY_ATTR"]),
            "category": p["category"], "query": p["query"].lower().strip(), "product_category": p["product_category"],
            "instructions": human.get(asin) if isinstance(human.get(asin), list) else [],
            "instruction_text": entry.get("instruction"), "instruction_attributes": entry.get("instruction_attributes")})
    return products


# ---------------------------------------------------------------- goals (goal.py)
def price_bound(price, rng):
    """(upper bound, instruction suffix): the larger of two of the four grid values above the price."""
    grid = [p for p in PRICE_RANGE if p > price][:4]
    if len(grid) < 2:
        return 1000000.0, ""
    upper = sorted(rng.sample(grid, 2))[1]
    return upper, ", and price lower than %.2f dollars" % upper


def make_goals(products, kind, rng):
    """The official goals (get_human_goals / get_synthetic_goals) and each product's price (uniform in a range)."""
    prices = {p["asin"]: p["pricing"][0] if len(p["pricing"]) == 1 else rng.uniform(*p["pricing"]) for p in products}
    goals = []
    for p in products:
        base = {k: p[k] for k in ("asin", "category", "query", "product_category")} | {"name": p["Title"]}
        if kind == "human":
            for rec in p["instructions"]:
                if not isinstance(rec, dict) or not rec.get("instruction_attributes"):
                    continue  # the official code skips instructions without attributes
                upper, text = price_bound(prices[p["asin"]], rng)
                goals.append(base | {"instruction": rec["instruction"].strip("."), "instruction_text":
                                     rec["instruction"].strip(".") + text, "attributes": list(rec["instruction_attributes"]),
                                     "price_upper": upper, "goal_options": list(rec.get("instruction_options") or [])})
        elif p["instruction_text"]:
            if not p["instruction_attributes"]:
                raise ValueError("webshop: %s has an instruction without instruction_attributes (%s)"
                                 % (p["asin"], FILES["attributes"]))
            upper, text = price_bound(prices[p["asin"]], rng)
            names = sorted(p["options"])
            for combo in itertools.product(*(p["options"][n] for n in names)):
                chosen = dict(zip(names, combo))
                with_text = " with " + ", and ".join("%s: %s" % kv for kv in chosen.items()) if chosen else ""
                goals.append(base | {"instruction": p["instruction_text"], "instruction_text": p["instruction_text"]
                                     + with_text + text, "attributes": list(p["instruction_attributes"]),
                                     "price_upper": upper, "goal_options": chosen})
    return goals, prices


def load_catalogue(folder, kind):
    """(products, {asin: product}, prices, goals shuffled with seed 233), parsed once per process."""
    key = (os.path.abspath(folder), kind) + tuple(os.stat(os.path.join(folder, f)).st_mtime_ns
                                                  for f in FILES.values() if os.path.isfile(os.path.join(folder, f)))
    if key not in _CATALOGUES:
        products = load_products(folder)
        rng = random.Random(233)
        goals, prices = make_goals(products, kind, rng)
        if len(goals) < 3:
            raise ValueError("webshop: %s yields %d %s goals; the train, valid and eval splits need at least 3"
                             % (folder, len(goals), kind))
        random.Random(233).shuffle(goals)
        _CATALOGUES[key] = products, {p["asin"]: p for p in products}, prices, goals
    return _CATALOGUES[key]


def split_goals(goals, split):
    """The last held_out goals are "eval", the held_out before them "valid", the rest "train"."""
    held_out = min(200, max(1, len(goals) // 10))
    n = len(goals)
    return {"eval": goals[n - held_out:], "valid": goals[n - 2 * held_out:n - held_out],
            "train": goals[:n - 2 * held_out]}[split]


def search_document(p):
    """What the official search indexes (convert_product_file_format.py)."""
    options = ", and ".join("%s: %s" % (name, ", ".join(values)) for name, values in p["options"].items())
    return " ".join([p["Title"], p["Description"], p["BulletPoints"][0] if p["BulletPoints"] else "", options]).lower()


# ---------------------------------------------------------------- reward (goal.py get_reward)
def fuzzy(a, b):
    """thefuzz's token-set ratio (0-100), the official matcher (0.19 there; 0.22 here, on rapidfuzz); a non-string
    is matched as its str(), as thefuzz does."""
    from thefuzz import fuzz
    return fuzz.token_set_ratio(a, b)


def normalize_color(text):
    """The first colour of COLOR_SET in `text` (a substring; an element, for a tuple), else `text` (normalize.py)."""
    return next((c for c in COLOR_SET if c in text), text)


_STOP = None


def title_nouns(title, how="words"):
    """The words of a title that count for the type reward: "words" (3+ letters, no stop word), or spaCy's nouns."""
    global _STOP
    if how == "spacy":
        import spacy  # the official tagger; needs en_core_web_sm installed
        if not hasattr(title_nouns, "nlp"):
            title_nouns.nlp = spacy.load("en_core_web_sm")
        return [t.text.lower() for t in title_nouns.nlp(title) if t.pos_ in ("PNOUN", "NOUN", "PROPN")]
    if _STOP is None:
        from bm25s.stopwords import STOPWORDS_EN
        _STOP = set(STOPWORDS_EN)
    return [w for w in re.findall(r"[a-z]+", title.lower()) if len(w) >= 3 and w not in _STOP]


def type_reward(product, goal, how="words"):
    query_match = product["query"] == goal["query"]
    levels = lambda c: {x.strip() for x in c.split("›")}  # noqa: E731
    category_match = len(levels(product["product_category"]) & levels(goal["product_category"])) >= 2
    bought, wanted = set(title_nouns(product["Title"], how)), title_nouns(goal["name"], how)
    title_score = len(bought & set(wanted)) / len(wanted) if wanted else 0.2
    r_type = 1.0 if query_match or category_match or title_score > 0.2 else 0.5
    return 0.0 if title_score == 0 else 0.1 if title_score < 0.1 else r_type


def get_reward(product, goal, price, options, how="words"):
    """The official reward of buying `product` at `price` with `options` {name: value} for `goal`, in [0, 1]."""
    text = (product["Title"].lower(), " ".join(product["BulletPoints"]).lower(), product["Description"].lower())
    n_att = sum(any(fuzzy(p, g) > 85 for p in product["Attributes"]) or any(g in t for t in text)
                for g in goal["attributes"])
    wanted = goal["goal_options"].items() if isinstance(goal["goal_options"], dict) else goal["goal_options"]
    chosen = [normalize_color(o) for o in options.values()]
    # a synthetic goal's options are (name, value) pairs, as the official code passes dict.items(): normalize_color
    # then tests membership, and thefuzz matches against the pair's text "('name', 'value')"
    n_opt = sum(any(fuzzy(c, normalize_color(g)) > 85 for c in chosen) for g in wanted)
    r_price = price <= goal["price_upper"]
    total = (n_att + n_opt + r_price) / (len(goal["attributes"]) + len(goal["goal_options"]) + 1)
    return total * type_reward(product, goal, how)


# ---------------------------------------------------------------- the environment
def parse_action(response):
    """("search" | "click", argument lower-cased and single-spaced) from the response, or None."""
    blocks = ACTION_RE.findall(response or "")
    m = CALL_RE.match(blocks[-1] if blocks else (response or ""))
    return (m.group(1).lower(), " ".join(m.group(2).lower().split())) if m else None


class WebShopEnv:
    """One WebShop goal per episode (the module docstring has the protocol and the defaults' sources)."""

    def __init__(self, split="train", data_dir=None, goals="synthetic", max_steps=15, reward="score",
                 invalid_penalty=0.0, nouns="words", page_chars=3000, history=3, cache_dir=None):
        if split not in ("train", "valid", "eval"):
            raise ValueError("split must be 'train', 'valid' or 'eval', not %r" % (split,))
        if goals not in ("synthetic", "human") or reward not in ("score", "success") or nouns not in ("words", "spacy"):
            raise ValueError("goals must be 'synthetic' or 'human', reward 'score' or 'success', nouns 'words' or "
                             "'spacy'; not %r, %r, %r" % (goals, reward, nouns))
        if min(max_steps, page_chars) < 1 or history < 0:
            raise ValueError("max_steps and page_chars must be >= 1 and history >= 0")
        folder = data_folder(data_dir)
        self.products, self.by_asin, self.prices, all_goals = load_catalogue(folder, goals)
        self.goals, self.split, self.kind = split_goals(all_goals, split), split, goals
        self.max_steps, self.reward_kind, self.invalid_penalty = max_steps, reward, invalid_penalty
        self.nouns, self.page_chars, self.history = nouns, page_chars, history
        self.system_prompt = SYSTEM
        cache_dir = cache_dir or os.path.join(os.environ.get("STEPPO_CACHE", os.path.expanduser("~/.cache/steppo")),
                                              "webshop")
        sources = [os.path.join(folder, FILES["products"]), os.path.join(folder, FILES["attributes"])]
        self.index = corpus_index(sources, lambda: [{"asin": p["asin"], "text": search_document(p)} for p in self.products],
                                  cache_dir, doc_text=lambda d: d["text"], kind="webshop-v1")
        self.done = True

    def __len__(self):
        return len(self.goals)

    def search(self, keywords):
        """The asins of the top 50 products for `keywords`, best first."""
        return [self.index.corpus[i]["asin"] for i in bm25_top(self.index, keywords, SEARCH_RETURN_N)]

    def reset(self, seed):
        self.goal = self.goals[seed % len(self.goals)]
        self.task_id = "webshop/%s/%s/%d" % (self.kind, self.split, seed % len(self.goals))
        self.t, self.done, self.won, self.score = 0, False, False, 0.0
        self.page, self.results, self.page_num, self.searches = "search", [], 1, []
        self.asin, self.options, self.sub, self.actions = None, {}, None, []
        return self.observation(), self._info(False)

    # ---- pages: the visible strings of the official templates, joined by " [SEP] "
    def clickables(self):
        """{clickable text (lower case): what it does}, for the current page."""
        if self.page == "search":
            return {}
        out = {"back to search": ("search",)}
        if self.page == "results":
            if self.page_num > 1:
                out["< prev"] = ("results", self.page_num - 1)
            out["next >"] = ("results", self.page_num + 1)  # on every results page, as the official template
            out.update({a.lower(): ("item", a) for a in self.page_asins()})
        elif self.page == "item":
            out["< prev"] = ("results", self.page_num)
            for name, values in self.by_asin[self.asin]["options"].items():
                out.update({v: ("option", name, v) for v in values})  # a value in two options: the last (official)
            out.update({s: ("sub", s) for s in SUB_PAGES} | {"buy now": ("buy",)})
        else:
            out["< prev"] = ("item", self.asin)
        return out

    def page_asins(self):
        return self.results[(self.page_num - 1) * PRODUCT_WINDOW:self.page_num * PRODUCT_WINDOW]

    def page_text(self):
        head = ["Instruction:", self.goal["instruction_text"]]
        if self.page == "search":
            parts = ["WebShop"] + head + ["Search"]
        elif self.page == "results":
            parts = head + ["Back to Search", "Page %d (Total results: %d)" % (self.page_num, len(self.results))]
            parts += (["< Prev"] if self.page_num > 1 else []) + ["Next >"]
            for a in self.page_asins():
                parts += [a, self.by_asin[a]["Title"], self.by_asin[a]["Price"]]
        else:
            p = self.by_asin[self.asin]
            parts = head + ["Back to Search", "< Prev"]
            if self.page == "item":
                for name, values in p["options"].items():
                    parts += [name] + values
                parts += [p["Title"], "Price: " + p["Price"], "Rating: N.A.", "Description", "Features", "Reviews",
                          "Buy Now"]
            elif self.sub == "description":
                parts.append(p["Description"])
            elif self.sub == "features":
                parts += p["BulletPoints"]
        return " [SEP] ".join(s for s in parts if s)

    def admissible(self):
        return (["search[<your query>]"] if self.page == "search" else []) + ["click[%s]" % c for c in self.clickables()]

    def observation(self):
        chosen = ", ".join("%s: %s" % kv for kv in self.options.items()) if self.page in ("item", "sub") else ""
        return "%s\n%sAvailable actions: %s" % (self.page_text(), "Selected options: %s\n" % chosen if chosen else "",
                                               ", ".join(self.admissible()))

    def step(self, response):
        if self.done:
            raise RuntimeError("step() called after the episode ended; call reset(seed) first")
        self.t += 1
        action, reward, bought, target = parse_action(response), 0.0, False, None
        if action and 0 < len(action[1]) <= MAX_ARG:
            if action[0] == "search":  # only where the page has a search bar
                target = ("query", action[1]) if self.page == "search" and re.search(r"[a-z0-9]", action[1]) else None
            else:
                target = self.clickables().get(action[1])
        if target is None:  # invalid: nothing changes
            reward = -float(self.invalid_penalty) if self.invalid_penalty else 0.0  # never -0.0
        else:
            self.actions.append("%s[%s]" % action)
            kind = target[0]
            if kind == "query":
                self.page, self.results, self.page_num = "results", self.search(target[1]), 1
                self.searches.append(target[1])
            elif kind == "search":
                self.page, self.options = "search", {}
            elif kind == "results":  # the results page forgets the options, as the official server
                self.page, self.page_num, self.options = "results", target[1], {}
            elif kind == "item":
                self.page, self.asin = "item", target[1]
            elif kind == "option":
                self.options[target[1]] = target[2]
            elif kind == "sub":
                self.page, self.sub = "sub", target[1]
            else:  # buy now: the official reward, the episode ends
                self.score = get_reward(self.by_asin[self.asin], self.goal, self.prices[self.asin], self.options,
                                        self.nouns)
                self.won, self.done, bought = self.score == 1.0, True, True
                reward = self.score if self.reward_kind == "score" else float(self.won)
        cut = not self.done and self.t >= self.max_steps
        self.done = self.done or cut
        info = self._info(target is None, bought)
        info["truncated"] = cut
        obs = "Thank you for shopping with us! Your score: %.2f [SEP] %s" % (100 * self.score, self.by_asin[self.asin]["Title"]) \
            if bought else self.observation()
        return obs, reward, self.done, info

    # ---- the expert and the window prompt
    def _expert(self):
        target = self.goal["asin"]
        if self.page == "search":  # the instruction, then (if it did not find the product) the product's own title
            query = self.by_asin[target]["Title"] if self.searches else self.goal["instruction"]
            return "<action>search[%s]</action>" % " ".join(query.lower().split())[:MAX_ARG]
        if self.page == "results":
            if target in self.page_asins():
                return "<action>click[%s]</action>" % target.lower()
            if target in self.results:
                ahead = self.results.index(target) // PRODUCT_WINDOW + 1 > self.page_num
                return "<action>click[%s]</action>" % ("next >" if ahead else "< prev")
            return "<action>click[back to search]</action>"
        if self.page == "sub" or self.asin != target:
            return "<action>click[< prev]</action>"
        options, wanted = self.by_asin[target]["options"], self.goal["goal_options"]
        for g in (wanted.values() if isinstance(wanted, dict) else wanted):  # the same value, else the closest one
            pairs = [(v == str(g).lower(), fuzzy(v, g), n, v) for n, values in options.items() for v in values]
            if pairs:  # (the ratio alone ties "large" with "x-large" and "8 fl oz" with "33.8 fl oz" at 100)
                *_, name, value = max(pairs, key=lambda x: x[:2])
                if self.options.get(name) != value:
                    return "<action>click[%s]</action>" % value
        return "<action>click[buy now]</action>"

    def _info(self, invalid, bought=False):
        return dict(task_id=self.task_id, won=self.won, invalid=invalid, admissible=None if bought else self.admissible(),
                    expert=None if self.done else self._expert(), prompt=None if bought else self.render_prompt(),
                    score=100 * self.score, step=self.t, task_type=self.goal.get("category") or None)

    def render_prompt(self):
        """The window context's user message: instruction, page (clipped), selected options, last actions."""
        page = self.page_text()
        page = page if len(page) <= self.page_chars else page[:self.page_chars - 3] + "..."
        lines = ["Instruction: %s" % self.goal["instruction_text"], "Step %d of %d." % (self.t, self.max_steps),
                 "Current page: %s" % page]
        if self.options and self.page in ("item", "sub"):
            lines.append("Selected options: " + ", ".join("%s: %s" % kv for kv in self.options.items()))
        if self.history and self.actions:
            lines.append("Last actions: " + "; ".join(self.actions[-self.history:]))
        lines.append("Available actions: " + ", ".join(self.admissible()))
        return "\n".join(lines + ["Answer with one <action>...</action>."])



# ---------------------------------------------------------------- an offline sample in the official schema
CATALOGUE = {  # category: (product_category path, {product type (the query): (attributes, {option: values})})
    "beauty": ("Beauty & Personal Care › {} › {}", {
        "deodorant": (["long lasting", "aluminum free", "sensitive skin", "natural ingredients", "travel size"],
                      {"scent": ["Citrus", "Lavender", "Unscented", "Cedar"], "size": ["2.1 Ounce (Pack of 1)", "2.1 Ounce (Pack of 2)"]}),
        "shampoo": (["sulfate free", "paraben free", "dry hair", "color safe", "cruelty free"],
                    {"size": ["8 Fl Oz", "16 Fl Oz", "33.8 Fl Oz"]}),
        "face moisturizer": (["fragrance free", "oily skin", "hyaluronic acid", "non comedogenic", "dermatologist tested"],
                             {"size": ["1.7 Ounce", "3.4 Ounce"], "style": ["Day Cream", "Night Cream"]}),
        "lip balm": (["shea butter", "natural ingredients", "cruelty free", "long lasting"],
                     {"flavor": ["Vanilla", "Mint", "Cherry", "Honey"]}),
        "nail polish": (["quick drying", "long lasting", "cruelty free", "non toxic"],
                        {"color": ["Red", "Pink", "Nude", "Navy Blue", "Black"]}),
        "hair dryer": (["ionic", "lightweight", "fast drying", "low noise"], {"color": ["Black", "Rose Gold", "White"]})}),
    "electronics": ("Electronics › {} › {}", {
        "wireless earbuds": (["noise cancelling", "water resistant", "long battery life", "bluetooth 5.0", "fast charging"],
                             {"color": ["Black", "White", "Blue"]}),
        "phone case": (["shockproof", "slim fit", "wireless charging compatible", "easy install"],
                       {"color": ["Black", "Clear", "Purple", "Dark Green"], "size": ["iPhone 13", "iPhone 14", "iPhone 14 Pro"]}),
        "usb c cable": (["fast charging", "braided nylon", "data sync", "durable"],
                        {"size": ["3 ft", "6 ft", "10 ft"], "color": ["Black", "Grey/White"]}),
        "bluetooth speaker": (["portable", "waterproof", "long battery life", "deep bass"],
                              {"color": ["Black", "Red", "Teal"]}),
        "wireless mouse": (["ergonomic", "silent click", "rechargeable", "plug and play"],
                           {"color": ["Black", "Grey", "Pink"]}),
        "hdmi cable": (["high speed", "4k", "gold plated", "durable"], {"size": ["6 ft", "10 ft", "15 ft"]})}),
    "fashion": ("Clothing, Shoes & Jewelry › {} › {}", {
        "t-shirt": (["machine wash", "cotton", "short sleeve", "relaxed fit", "crew neck"],
                    {"color": ["White", "Black", "Heather Grey", "Navy"], "size": ["Small", "Medium", "X-Large"]}),
        "running shoes": (["lightweight", "breathable", "rubber sole", "memory foam", "non slip"],
                          {"color": ["Black/White", "Grey", "Blue"], "size": ["8", "9.5", "11"]}),
        "rain jacket": (["waterproof", "hooded", "zip closure", "packable"],
                        {"color": ["Yellow", "Olive", "Black"], "size": ["Medium", "Large", "XX-Large"]}),
        "yoga pants": (["high waist", "tummy control", "moisture wicking", "four way stretch"],
                       {"color": ["Black", "Burgundy", "Charcoal"], "size": ["X-Small", "Medium", "X-Large"]}),
        "wool socks": (["warm", "cushioned", "moisture wicking", "merino wool"],
                       {"size": ["Medium", "Large"], "color": ["Grey", "Brown", "Multicolor"]}),
        "baseball cap": (["adjustable", "cotton", "sun protection"], {"color": ["Khaki", "Black", "Red", "Navy"]})}),
    "garden": ("Patio, Lawn & Garden › {} › {}", {
        "solar lights": (["waterproof", "easy install", "auto on off", "warm white"],
                         {"size": ["4 Pack", "8 Pack", "12 Pack"]}),
        "garden hose": (["heavy duty", "kink free", "lightweight", "leak proof"],
                        {"size": ["25 ft", "50 ft", "100 ft"], "color": ["Green", "Blue"]}),
        "planter": (["drainage hole", "indoor outdoor", "ceramic", "modern design"],
                    {"size": ["6 inch", "8 inch", "10 inch"], "color": ["White", "Terracotta", "Grey"]}),
        "bird feeder": (["squirrel proof", "easy to clean", "weather resistant", "hanging"],
                        {"style": ["Tube", "House", "Window"]}),
        "garden gloves": (["puncture resistant", "breathable", "touchscreen", "washable"],
                          {"size": ["Small", "Medium", "Large"], "color": ["Pink", "Green", "Black"]}),
        "pruning shears": (["stainless steel", "ergonomic", "sharp", "safety lock"], {})}),
    "grocery": ("Grocery & Gourmet Food › {} › {}", {
        "ground coffee": (["medium roast", "fair trade", "organic", "100% arabica", "low acid"],
                          {"flavor": ["Original", "Hazelnut", "Vanilla", "French Roast"], "size": ["12 Ounce", "2 Pound"]}),
        "green tea": (["caffeine free", "organic", "non gmo", "individually wrapped"],
                      {"flavor": ["Jasmine", "Mint", "Lemon"], "size": ["20 Count", "100 Count"]}),
        "granola": (["gluten free", "low sugar", "high protein", "whole grain"],
                    {"flavor": ["Honey Almond", "Dark Chocolate", "Berry"], "size": ["11 Ounce (Pack of 1)", "11 Ounce (Pack of 3)"]}),
        "olive oil": (["extra virgin", "cold pressed", "non gmo", "kosher"], {"size": ["16.9 Fl Oz", "33.8 Fl Oz", "1 Gallon"]}),
        "dark chocolate": (["vegan", "low sugar", "fair trade", "keto friendly"],
                           {"flavor": ["Sea Salt", "Mint", "Orange", "Almond"]}),
        "mixed nuts": (["roasted", "unsalted", "high protein", "resealable bag"], {"size": ["1 Pound", "2.5 Pound"]})}),
}
BRANDS = ["Alder", "Brightwell", "Corvo", "Dunmore", "Elara", "Fenwick", "Galeo", "Harlow", "Islay", "Juniper",
          "Kestrel", "Lumen", "Marlow", "Northby", "Oriel", "Pellam", "Quarry", "Rowan", "Sable", "Tamsin"]
STYLES = ["Classic", "Premium", "Everyday", "Ultra", "Essential", "Pro", "Original", "Signature"]


def make_sample(folder, per_type=9, seed=0):
    """Write the three official files into `folder`: per_type invented products of each of 30 product types in five
    categories, with options, single or ranged prices, 3 of the type's attributes each, an items_ins_v2
    instruction for 2 in 3 products (synthetic goals) and human-style instructions with options for 1 in 3
    (human goals). Deterministic; returns {"products": n, "synthetic goals": n, "human goals": n}."""
    rng = random.Random(seed)
    products, attributes, human = [], {}, {}
    for category, (path, types) in CATALOGUE.items():
        for kind, (attrs, options) in types.items():
            for j in range(per_type):
                asin = "B0%08d" % (len(products) * 7919 % 10 ** 8)
                chosen = rng.sample(attrs, 3)
                brand, style = rng.choice(BRANDS), rng.choice(STYLES)
                name = "%s %s %s, %s and %s" % (brand, style, kind.title(), chosen[0].title(), chosen[1])
                opts = {n: [{"value": v, "image": "https://example.com/%s/%s.jpg" % (asin, i)}
                            for i, v in enumerate(rng.sample(vs, rng.randint(min(2, len(vs)), len(vs))))]
                        for n, vs in options.items()}
                low = round(rng.uniform(5, 120), 2)
                pricing = "$%.2f" % low if rng.random() < 0.7 else "$%.2f - $%.2f" % (low, low + round(rng.uniform(2, 40), 2))
                products.append({
                    "asin": asin, "name": name, "category": category, "query": kind,
                    "product_category": path.format(kind.title() + "s", kind.title()),
                    "full_description": "The %s %s from %s: %s. %s." % (style.lower(), kind, brand, ", ".join(chosen),
                                                                      rng.choice(["Made to last", "Loved by customers",
                                                                                  "Backed by a one-year warranty"])),
                    "small_description": ["%s %s" % (a.capitalize(), kind) for a in chosen],
                    "pricing": pricing, "images": ["https://example.com/%s/main.jpg" % asin],
                    "customization_options": opts if opts else None,
                    "brand": brand, "list_price": "", "availability_status": "In Stock"})  # scrape fields: dropped
                attributes[asin] = {"attributes": chosen}
                if j % 3 != 2:  # a synthetic-goal instruction naming two of its attributes
                    attributes[asin].update(instruction="i need a %s %s that is %s" % (chosen[0], kind, chosen[1]),
                                            instruction_attributes=chosen[:2])
                if j % 3 == 1:  # a human-style instruction with one value of each option
                    values = [rng.choice(o)["value"].lower() for o in opts.values()]
                    human[asin] = [{"asin": asin, "instruction": "i am looking for %s %s with %s%s." % (
                        "an" if chosen[2][0] in "aeiou" else "a", kind, chosen[2], "".join(", " + v for v in values)),
                        "instruction_attributes": [chosen[2]], "instruction_options": values,
                        "attributes": chosen, "options": ["%s: %s" % kv for kv in zip(opts, values)],
                        "worker_id": "SAMPLE"}, {"asin": asin, "instruction": "something nice",
                                                 "instruction_attributes": [], "instruction_options": []}]  # skipped
    os.makedirs(folder, exist_ok=True)
    for key, data in (("products", products), ("attributes", attributes), ("human", human)):
        with open(os.path.join(folder, FILES[key]), "w", encoding="utf-8") as f:
            json.dump(data, f)
    loaded = load_products(folder)
    return {"products": len(loaded), "synthetic goals": len(make_goals(loaded, "synthetic", random.Random(0))[0]),
            "human goals": len(make_goals(loaded, "human", random.Random(0))[0])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="WebShop env tools.")
    parser.add_argument("--make-sample", metavar="DIR", required=True,
                        help="write an offline catalogue with the official file names and schema into DIR")
    args = parser.parse_args()
    print("wrote", make_sample(args.make_sample), "to", args.make_sample)
