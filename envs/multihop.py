"""Multi-hop question answering with a search tool, offline (the paper's second domain, in miniature).

A seeded knowledge base of made-up people, companies and products; each entity has a fact card:

    Velmora Labs: a company. Founded by Ysolde Karrow. Based in Tarnhollow.

A question composes 2 to 4 relations ("Who mentored the founder of the company that built the Quillon
X2?") and names only the first entity, so answering takes one search per hop. Actions, in the same
`<action>...</action>` wrapper as envs/alfworld.py (the LAST block counts, thinking before it allowed):

    <action>search[Velmora Labs]</action>   -> that entity's fact card, or "No result for ..."
    <action>answer[Ysolde Karrow]</action>  -> ends the episode: reward 1 on a normalised exact match

Anything else is invalid (`info["invalid"]`, reward `-invalid_penalty`, the episode goes on). The expert
searches the chain's entities in order and then answers, so an expert episode takes hops + 1 steps.
The expert is impatient by default: in a fraction `expert_slip` = 0.7 of the episodes (drawn from the reset seed)
it answers one hop early, with the last entity it has found (a wrong answer). Imitating it teaches the action
format and reading, and the habit of stopping too soon, which RL can unlearn from the reward: the warm start's
greedy policy answers early on most questions, and the default run learns to finish the chain (docs/results.md "The default
run"). `expert_slip=0` gives an expert that always wins.
`split="train"`, `"valid"` and `"eval"` draw questions from disjoint parts (62.5%, 12.5%, 25%) of all chains of
the knowledge base (same KB, so eval measures generalisation to new questions, not new facts); valid is for
choosing settings without looking at eval. `worlds="per_task"` draws a fresh KB for every task instead (train,
valid and eval never share a world). Pure Python.

Observations: `reset` returns the question (and the action format); `step` returns the search result.
`info["prompt"]` is a fresh self-contained message: the question and every search result so far
(searches are short, so the "window" keeps all of them).
"""
import random
import re

FIRST = ["Ysolde", "Corvin", "Maelis", "Taddeo", "Irune", "Bastian", "Odile", "Kasimir", "Liora", "Evander",
         "Sunniva", "Aurelio", "Nerys", "Thorvald", "Quilla", "Dariusz", "Fenella", "Orrin", "Zelie", "Hollis"]
LAST = ["Karrow", "Ashdown", "Velasquin", "Throssel", "Moravec", "Quist", "Beaulieu", "Hartigan", "Oyelaran",
        "Strand", "Pelloux", "Vantongeren", "Ilves", "Marchetti", "Dunleavy", "Sorensen", "Achterberg", "Nakamura"]
COMPANY = ["Velmora", "Brightwater", "Quorra", "Halcyon", "Ostrava", "Kestrel", "Lumen", "Tessaly", "Arbora",
           "Northwind", "Cindral", "Parallax", "Ferrovia", "Glasswing", "Umbra", "Solenne"]
SUFFIX = ["Labs", "Works", "Dynamics", "Systems", "Foundry", "Collective"]
PRODUCT = ["Quillon", "Aster", "Marrow", "Tidebox", "Pellucid", "Gyre", "Sablefin", "Orison", "Kettlewing",
           "Lanthorn", "Vesper", "Cobalt", "Nimbus", "Ferret", "Halo", "Juniper"]
CITY = ["Tarnhollow", "Elsmere", "Quarrington", "Vadstena", "Oakhurst", "Brindlemoor", "Saltmarsh", "Korvale"]

# relation -> (phrase in a question, phrase on a fact card)
RELATIONS = {
    "built_by": ("the company that built {}", "Built by {}."),        # product -> company
    "founder": ("the founder of {}", "Founded by {}."),              # company -> person
    "mentor": ("the mentor of {}", "Mentored by {}."),                # person -> person
    "hometown": ("the hometown of {}", "Born in {}."),               # person -> city
}
SYSTEM_PROMPT = (
    "You answer questions about a fictional world using a search tool. Each turn, write exactly one action "
    "inside an action tag: <action>search[entity name]</action> returns that entity's fact card; "
    "<action>answer[your answer]</action> ends the episode. You may think briefly before the tag; only "
    "the last <action>...</action> block is executed. Search one entity at a time, starting from the one "
    "named in the question.")
ACTION_RE = re.compile(r"<action>(.*?)</action>", re.IGNORECASE | re.DOTALL)
CALL_RE = re.compile(r"^\s*(search|answer)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)


def normalize(text):
    """Lower case, no punctuation or articles, single spaces (SQuAD-style exact match)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def parse_call(response):
    """(tool, argument) from the last `<action>tool[arg]</action>` of `response`, or None."""
    found = ACTION_RE.findall(response or "")
    m = CALL_RE.match(found[-1]) if found else None
    if not m or not m.group(2).strip():
        return None
    return m.group(1).lower(), " ".join(m.group(2).split())


def build_kb(seed, n_people=12, n_companies=6, n_products=8):
    """A seeded KB: {name: {"type": ..., relation: target name}}. Every relation used by questions exists."""
    rng = random.Random(seed)
    people = rng.sample(["%s %s" % (f, l) for f in FIRST for l in LAST], n_people)
    companies = rng.sample(["%s %s" % (c, s) for c in COMPANY for s in SUFFIX], n_companies)
    products = rng.sample(["%s %s" % (p, rng.choice(["X2", "Mk I", "Pro", "Mini", "9", "Air"])) for p in PRODUCT],
                          n_products)
    kb = {}
    for i, p in enumerate(people):  # mentor chains never loop back onto the person
        kb[p] = {"type": "person", "hometown": rng.choice(CITY), "mentor": people[(i + 1 + rng.randrange(n_people - 1)) % n_people]}
    for c in companies:
        kb[c] = {"type": "company", "founder": rng.choice(people)}
    for p in products:
        kb[p] = {"type": "product", "built_by": rng.choice(companies)}
    return kb


def card(kb, name):
    """The fact card `search[name]` returns."""
    e = kb[name]
    facts = " ".join(RELATIONS[r][1].format(v) for r, v in e.items() if r in RELATIONS)
    return "%s: a %s. %s" % (name, e["type"], facts)


def all_chains(kb, min_hops=2, max_hops=4):
    """Every question chain: (start entity, [relations]) with 2-4 hops, sorted (deterministic)."""
    nexts = {"product": ["built_by"], "company": ["founder"], "person": ["mentor", "hometown"]}
    chains = []

    def extend(start, name, rels):
        if min_hops <= len(rels):
            chains.append((start, list(rels)))
        if len(rels) == max_hops or name not in kb:
            return
        for r in nexts[kb[name]["type"]]:
            extend(start, kb[name][r], rels + [r])

    for start in sorted(kb):
        extend(start, start, [])
    return chains


def question(start, rels):
    """The question text for a chain, e.g. "Who mentored the founder of Velmora Labs?"."""
    phrase = start
    for r in rels[:-1]:
        phrase = RELATIONS[r][0].format(phrase)
    last = rels[-1]
    q = {"mentor": "Who mentored {}?", "founder": "Who founded {}?", "built_by": "Which company built {}?",
         "hometown": "In which city was {} born?"}[last].format(phrase)
    return q[0].upper() + q[1:]


class MultiHopEnv:
    """One question per episode (see the module docstring for the protocol)."""

    def __init__(self, split="train", kb_seed=0, max_steps=8, invalid_penalty=0.0, n_people=12, n_companies=6,
                 n_products=8, min_hops=2, max_hops=4, worlds="shared", expert_slip=0.7):
        if split not in ("train", "valid", "eval"):
            raise ValueError("split must be 'train', 'valid' or 'eval', not %r" % (split,))
        if worlds not in ("shared", "per_task"):
            raise ValueError("worlds must be 'shared' or 'per_task', not %r" % (worlds,))
        if not 0.0 <= expert_slip <= 1.0:
            raise ValueError("expert_slip must be in [0, 1], not %r" % (expert_slip,))
        self.split, self.max_steps, self.invalid_penalty = split, max_steps, invalid_penalty
        self.expert_slip = expert_slip
        self.system_prompt = SYSTEM_PROMPT
        self.worlds, self.kb_seed, self.sizes, self.hops = worlds, kb_seed, (n_people, n_companies, n_products), (min_hops, max_hops)
        self.kb = build_kb(kb_seed, n_people, n_companies, n_products)
        self.index = {normalize(n): n for n in self.kb}
        chains = all_chains(self.kb, min_hops, max_hops)
        random.Random(kb_seed + 1).shuffle(chains)
        n_eval, n_valid = max(1, len(chains) // 4), max(1, len(chains) // 8)  # 25% eval, 12.5% valid, the rest train
        self.tasks = {"eval": chains[:n_eval], "valid": chains[n_eval:n_eval + n_valid],
                      "train": chains[n_eval + n_valid:]}[split]
        self.done = True

    def __len__(self):
        return len(self.tasks)

    def reset(self, seed):
        if self.worlds == "per_task":  # a fresh world per task: train and eval worlds never coincide
            world = self.kb_seed * 1_000_003 + 3 * seed + ("train", "eval", "valid").index(self.split)
            self.kb = build_kb(world, *self.sizes)
            self.index = {normalize(n): n for n in self.kb}
            chains = all_chains(self.kb, *self.hops)
            start, rels = chains[random.Random(world).randrange(len(chains))]
        else:
            start, rels = self.tasks[seed % len(self.tasks)]
        self.question = question(start, rels)
        self.path = [start]  # entities the minimal chain searches
        for r in rels:
            self.path.append(self.kb[self.path[-1]][r])
        self.gold = self.path[-1]
        self.slip = random.Random(seed * 7919 + 17).random() < self.expert_slip  # this episode's expert answers early
        self.task_id = "multihop/%s/%s/%s" % (self.split, start, "/".join(rels))
        if self.worlds == "per_task":
            self.task_id += "/world%d" % seed
        self.t, self.done, self.won, self.found, self.trace = 0, False, False, set(), []
        obs = "Question: %s\nSearch with <action>search[name]</action>; answer with <action>answer[text]</action>." % self.question
        return obs, self._info(False)

    def step(self, response):
        if self.done:
            raise RuntimeError("step() called after the episode ended; call reset(seed) first")
        self.t += 1
        call = parse_call(response)
        reward, invalid = 0.0, False
        if call is None:
            obs, invalid = ("Invalid response: write one action as <action>search[name]</action> or "
                            "<action>answer[text]</action>."), True
            reward = -float(self.invalid_penalty) if self.invalid_penalty else 0.0  # never -0.0
        elif call[0] == "search":
            name = self.index.get(normalize(call[1]))
            obs = card(self.kb, name) if name else "No result for \"%s\"." % call[1][:80]
            if name:
                self.found.add(name)
        else:
            self.won = normalize(call[1]) == normalize(self.gold)
            reward, self.done = float(self.won), True
            obs = "Correct." if self.won else "Wrong answer."
        self.trace.append(("%s[%s]" % call if call else "(invalid)", obs))
        self.done = self.done or self.t >= self.max_steps
        info = self._info(invalid)
        info["truncated"] = self.done and not (call and call[0] == "answer")
        return obs, reward, self.done, info

    def _expert(self):
        path = self.path[:-1] if self.slip else self.path  # a slip stops one hop early
        for name in path[:-1]:  # search each entity of the chain once, then answer
            if name not in self.found:
                return "<action>search[%s]</action>" % name
        return "<action>answer[%s]</action>" % path[-1]

    def _info(self, invalid):
        return dict(task_id=self.task_id, won=self.won, invalid=invalid, admissible=None,
                    expert=None if self.done else self._expert(), prompt=self.render_prompt(), step=self.t,
                    task_type="hops%d" % (len(self.path) - 1))  # per-type evaluation: by the number of hops

    def render_prompt(self):
        """Self-contained user message: question, all search results so far, the action format."""
        hist = "".join("\n[Step %d] %s -> %s" % (i + 1, a, o) for i, (a, o) in enumerate(self.trace))
        return ("Question: %s\nSteps taken: %d of %d.%s\nWrite your next action as <action>search[name]</action> "
                "or <action>answer[text]</action>." % (self.question, self.t, self.max_steps, hist))
