"""HotpotQA (Yang et al. 2018, arXiv 1809.09600) with a BM25 search tool: the StepPO paper's first domain.

Data: the official JSON files, `hotpot_train_v1.1.json` (split "train") and `hotpot_dev_distractor_v1.json`
(split "eval") in `data_dir=` or `$HOTPOTQA_DATA`; each entry has `_id`, `question`, `answer`,
`supporting_facts` ([title, sentence id] pairs) and `context` ([title, [sentences]] pairs, 10 paragraphs).
`python -m envs.hotpotqa --make-sample DIR` writes a small offline sample in that layout, generated from the
knowledge base of envs/multihop.py (fact cards as paragraphs, 2-4 hop questions, disjoint train/dev questions).

Search (`search=`), ranked with BM25 (Robertson & Zaragoza 2009, Lucene's variant, k1=1.5, b=0.75, English
stop words, no stemming) by `bm25s` (Lù 2024, arXiv 2407.03618) over "title: text" strings:
    "distractor"  each question's own context paragraphs (a 10-document index built at reset, ~1.5 ms)
    "corpus"      one shared index over `corpus=` (JSONL, one {"title", "text"} per line) or, when none is given,
                  over the union of all paragraphs in the data files; built once, cached on disk under
                  `cache_dir=` (default $STEPPO_CACHE/hotpotqa or ~/.cache/steppo/hotpotqa), keyed by the
                  sources' path, size and mtime, built by one process at a time (a file lock), written to a
                  temp folder and renamed.
A search returns the `top_k` best passages with a positive score, each clipped to `passage_chars`.

Actions (`action_format=`), the LAST block counts, thinking before it allowed:
    "tag"   <action>search[query]</action> / <action>answer[text]</action>, as envs/multihop.py
    "tool"  <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call> / <answer>text</answer>,
            the authors' format (AgentR1/StepPO recipe/hotpotqa/prompts.py). The env declares `tools` (the
            search function's JSON schema) and rollout.py passes them to the chat template, so a Qwen2.5 or
            Llama-3 instruct model sees its own tool format; the system prompt also describes the format in
            text, so templates without tool support work too. Like the authors' parser, single quotes / a
            Python dict literal and arguments given as a JSON string are accepted; so is Llama-3's "parameters".
Anything else (no block, broken JSON, an unknown tool, an empty query, a query or answer over 500 characters)
is invalid: `info["invalid"]`, reward `-invalid_penalty`, the episode goes on. An answer ends the episode:
reward 1 on an exact match after the official answer normalisation (hotpot_evaluate_v1.py), `info["f1"]` the
official F1. The expert searches each supporting title not yet seen in a result, then answers.

Observations: the search results (the message for the next turn in "full" context). `info["prompt"]` is a fresh
self-contained message for the "window" context, the authors' per-step prompt in short: question, searches so
far, the passages retrieved (deduplicated, newest kept within `prompt_chars`), the last error and the format.
Defaults from the authors' recipe (recipe/hotpotqa/base.yaml, hotpotqa_agent_flow.py, utils.py): max_steps 5,
top_k 5, 1200 characters per passage, 30720 characters of passages (3 per token of their 10240-token prompt).
Where we differ from that recipe: BM25 instead of dense retrieval (BGE + FAISS), one action per turn (they allow
up to 4 parallel searches, and search the question itself before the first turn), and a window prompt that keeps
the newest passages (theirs keeps the oldest) when the budget is hit.
"""
import argparse
import ast
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import string
import tempfile
from collections import Counter

import numpy as np

from envs import multihop


def _bm25s():
    """bm25s, imported on first use: it loads numba, whose llvmlite breaks vLLM's module scan in the same process."""
    import bm25s
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG
    return bm25s

FILES = {"train": "hotpot_train_v1.1.json", "eval": "hotpot_dev_distractor_v1.json"}
URL = "http://curtis.ml.cmu.edu/datasets/hotpot/"
SCHEMA = ('a JSON list of {"_id": str, "question": str, "answer": str, "supporting_facts": [[title, sentence_id], '
          '...], "context": [[title, [sentence, ...]], ...]}')
HOW_TO_GET = ("Download the official files into one folder: wget %s%s %s%s; or write a small offline sample in "
              "that layout: python -m envs.hotpotqa --make-sample DIR" % (URL, FILES["train"], URL, FILES["eval"]))
MAX_ARG = 500  # characters: a longer query or answer is invalid
INDEX_VERSION = 1  # bump when the cached index format changes

SEARCH_TOOL = {"type": "function", "function": {  # OpenAI function format, as transformers' `tools=` expects
    "name": "search",
    "description": "Search Wikipedia. Returns the best matching passages (title: text); a page title works best.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "A title or keywords."}},
                   "required": ["query"]}}}
INTRO = ("You answer questions that need facts from two or more Wikipedia paragraphs, using a search tool. "
         "Search one title or a few keywords at a time, follow the question's chain, then answer with a short "
         "answer (a name, a date, yes or no). ")
SYSTEM = {
    "tag": INTRO + ("Each turn, write exactly one action inside an action tag: <action>search[query]</action> "
                    "returns the best passages; <action>answer[your answer]</action> ends the episode. You may think "
                    "briefly before the tag; only the last <action>...</action> block is executed."),
    "tool": INTRO + ("Each turn, do exactly one thing. To search, call the search tool: <tool_call>\n{\"name\": "
                     "\"search\", \"arguments\": {\"query\": \"...\"}}\n</tool_call> returns the best passages. To "
                     "answer, write <answer>your answer</answer>; that ends the episode. You may think briefly "
                     "first; only the last <tool_call> or <answer> block is executed.")}
HINT = {"tag": "Search with <action>search[query]</action>; answer with <action>answer[text]</action>.",
        "tool": "Search with <tool_call>{\"name\": \"search\", \"arguments\": {\"query\": \"...\"}}</tool_call>; "
                "answer with <answer>text</answer>."}
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


# ---------------------------------------------------------------- answer metrics (official hotpot_evaluate_v1.py)
def normalize_answer(s):
    """Lower case, no punctuation, no articles (a, an, the), single spaces: the SQuAD / HotpotQA normalisation."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1_score(prediction, gold):
    """Token F1 of the normalised answers; yes / no / noanswer score 0 unless they match exactly."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    same = sum((Counter(pred.split()) & Counter(ref.split())).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred.split()), same / len(ref.split())
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- data: the official JSON files
_QUESTIONS = {}  # (path, size, mtime) -> questions: every env of a process shares one parsed file


def data_file(data_dir, split):
    """The official file for `split` in `data_dir` (or $HOTPOTQA_DATA); a clear error if there is none."""
    folder = data_dir if data_dir is not None else os.environ.get("HOTPOTQA_DATA")
    if not folder:
        raise ValueError("hotpotqa needs the official HotpotQA files: pass data_dir (--env-kwargs '{\"data_dir\": "
                         "\"/path\"}') or set $HOTPOTQA_DATA to a folder holding %s (split 'train') and %s (split "
                         "'eval'). %s" % (FILES["train"], FILES["eval"], HOW_TO_GET))
    path = os.path.join(folder, FILES[split])
    if not os.path.isfile(path):
        raise ValueError("no HotpotQA file for split=%r: %s does not exist (expected %s for 'train' and %s for "
                         "'eval' in %s). %s" % (split, path, FILES["train"], FILES["eval"], folder, HOW_TO_GET))
    return path


def _stamp(path):
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _parse(row, i, path):
    """One official entry -> {"id", "question", "answer", "support": titles in order, "context": [(title, text)]}."""
    ok = {"_id": lambda v: isinstance(v, str), "question": lambda v: isinstance(v, str),
          "answer": lambda v: isinstance(v, str),
          "supporting_facts": lambda v: isinstance(v, list) and all(
              isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and isinstance(f[1], int) for f in v),
          "context": lambda v: isinstance(v, list) and len(v) > 0 and all(
              isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list)
              and all(isinstance(s, str) for s in p[1]) for p in v)}
    for key, check in ok.items():
        if not isinstance(row, dict) or not check(row.get(key)):
            raise ValueError("%s: entry %d has a missing or malformed %r; expected %s (the test file has no answers: "
                             "use the train and dev files)" % (path, i, key, SCHEMA))
    return {"id": row["_id"], "question": row["question"], "answer": row["answer"],
            "support": list(dict.fromkeys(title for title, _ in row["supporting_facts"])),
            "context": [(title, " ".join(" ".join(s.split()) for s in sents).strip())
                        for title, sents in row["context"]]}


def load_questions(path):
    """Parse and check an official HotpotQA JSON file (once per process; shared by every env)."""
    key = _stamp(path)
    if key not in _QUESTIONS:
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError("%s: cannot be read as JSON (%s); expected %s" % (path, e, SCHEMA)) from None
        if not isinstance(rows, list) or not rows:
            raise ValueError("%s: not a HotpotQA file; expected %s" % (path, SCHEMA))
        _QUESTIONS[key] = [_parse(row, i, path) for i, row in enumerate(rows)]
    return _QUESTIONS[key]


# ---------------------------------------------------------------- BM25 search (bm25s)
_INDEXES = {}  # cache folder -> loaded corpus index, shared by every env of a process


def bm25_index(docs):
    """A BM25 index over a list of strings (bm25s defaults: Lucene BM25, k1=1.5, b=0.75; English stop words)."""
    bm25s = _bm25s()
    index = bm25s.BM25()
    index.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    return index


def bm25_top(index, query, k):
    """Indices of the (at most) k documents with the highest positive BM25 score for `query`, best first."""
    ids = index.get_tokens_ids(_bm25s().tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0])
    if not ids:  # only stop words or words the index has never seen
        return []
    scores = index.get_scores_from_ids(ids)  # (num_docs,)
    top = np.argpartition(-scores, min(k, len(scores)) - 1)[:k]
    top = top[np.lexsort((top, -scores[top]))]  # by score, ties by document order: deterministic
    return [int(i) for i in top if scores[i] > 0]


def file_passages(paths):
    """The union of all context paragraphs of the data files, deduplicated, as [{"title", "text"}]."""
    seen = {}
    for path in paths:
        for q in load_questions(path):
            for title, text in q["context"]:
                seen.setdefault((title, text), {"title": title, "text": text})
    return list(seen.values())


def jsonl_passages(path):
    """A user corpus: one {"title": str, "text": str (or a list of sentences)} JSON object per line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            text = row.get("text") if isinstance(row, dict) else None
            text = " ".join(text) if isinstance(text, list) and all(isinstance(s, str) for s in text) else text
            if not isinstance(text, str) or not isinstance(row.get("title"), str):
                raise ValueError('%s, line %d: expected one JSON object {"title": str, "text": str} per line'
                                 % (path, n))
            out.append({"title": row["title"], "text": " ".join(text.split())})
    if not out:
        raise ValueError('%s: no passages; expected one JSON object {"title": str, "text": str} per line' % path)
    return out


def title_and_text(passage):
    """What a passage's BM25 document is: "title: text"."""
    return "%s: %s" % (passage["title"], passage["text"])


def build_corpus_index(folder, passages, doc_text=title_and_text):
    """Index passages (dicts; doc_text(passage) is what is indexed, "title: text" by default) and save index +
    passages to `folder`: a temp folder, then a rename."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(folder) + ".tmp")
    try:
        bm25_index([doc_text(p) for p in passages]).save(tmp, corpus=passages, show_progress=False)
        lines = os.path.join(tmp, "corpus.jsonl")  # + its line offsets, so loading never scans it
        corpus = _bm25s().utils.corpus
        corpus.save_mmindex(corpus.find_newline_positions(lines, show_progress=False), lines)
        os.rename(tmp, folder)
    except OSError:
        if not os.path.isdir(folder):  # else a concurrent builder won the race: use its copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_index(sources, read_passages, cache_dir, doc_text=title_and_text, kind="passages"):
    """The cached BM25 index over the passages from `sources` (files), built on first use; corpus memory-mapped.
    `kind` names what doc_text makes of a passage (part of the cache key, with the sources' path, size, mtime)."""
    key = hashlib.sha1(json.dumps([INDEX_VERSION, kind, _bm25s().__version__, [_stamp(p) for p in sources]]).encode())
    folder = os.path.join(cache_dir, "bm25-" + key.hexdigest()[:16])
    if folder not in _INDEXES:
        os.makedirs(cache_dir, exist_ok=True)
        with open(folder + ".lock", "w") as lock:  # one builder at a time (e.g. torchrun's processes); others wait
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isdir(folder):
                build_corpus_index(folder, read_passages(), doc_text)
        _INDEXES[folder] = _bm25s().BM25.load(folder, load_corpus=True, mmap=True, show_progress=False, verbosity=0)
    return _INDEXES[folder]


# ---------------------------------------------------------------- actions
def _literal(text):
    """JSON, else a Python literal (single quotes, True/None) for short texts without dunders, as the authors'
    `_json_or_python_dict` (recipe/hotpotqa/hotpotqa_agent_flow.py); None if neither parses."""
    try:
        return json.loads(text)
    except Exception:  # ValueError, RecursionError
        pass
    if len(text) > 8192 or "__" in text:
        return None
    try:
        return ast.literal_eval(text.strip())
    except Exception:  # SyntaxError, ValueError, MemoryError, RecursionError, ...
        return None


def parse_tag(response):
    """("search" | "answer", argument) from the last <action>tool[arg]</action>, or (None, what is wrong)."""
    call = multihop.parse_call(response)
    return call or (None, "write one action as <action>search[query]</action> or <action>answer[text]</action>")


def parse_tool(response):
    """("search", query) from the last <tool_call>{"name": "search", "arguments": {"query": ...}}</tool_call>, or
    ("answer", text) when the last block is <answer>text</answer>, or (None, what is wrong)."""
    text = response or ""
    blocks = [(m.start(), "call", m.group(1)) for m in TOOL_CALL_RE.finditer(text)]
    blocks += [(m.start(), "answer", m.group(1)) for m in ANSWER_RE.finditer(text)]
    if not blocks:
        return None, "no <tool_call>...</tool_call> or <answer>...</answer> block"
    _, kind, body = max(blocks)
    if kind == "answer":
        return ("answer", " ".join(body.split())) if body.strip() else (None, "empty answer")
    call = _literal(body)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None, 'the tool call is not a JSON object {"name": ..., "arguments": {...}}'
    if call["name"] != "search":
        return None, "unknown tool %r (the only tool is search)" % call["name"][:40]
    args = call.get("arguments", call.get("parameters"))
    args = _literal(args) if isinstance(args, str) else args
    query = args.get("query") if isinstance(args, dict) else None
    if not isinstance(query, str) or not query.strip():
        return None, 'search needs a non-empty "query" string in "arguments"'
    return "search", " ".join(query.split())


# ---------------------------------------------------------------- the environment
class HotpotQAEnv:
    """One HotpotQA question per episode (see the module docstring for the protocol and the defaults' sources)."""

    def __init__(self, split="train", data_dir=None, search="distractor", corpus=None, action_format="tag",
                 max_steps=5, top_k=5, passage_chars=1200, prompt_chars=30720, invalid_penalty=0.0, cache_dir=None):
        if split not in FILES:
            raise ValueError("split must be 'train' or 'eval', not %r" % (split,))
        if search not in ("distractor", "corpus") or action_format not in SYSTEM:
            raise ValueError("search must be 'distractor' or 'corpus' and action_format 'tag' or 'tool', not %r, %r"
                             % (search, action_format))
        if corpus is not None and search != "corpus":
            raise ValueError("corpus= is the document collection of search='corpus'")
        if min(max_steps, top_k, passage_chars, prompt_chars) < 1:
            raise ValueError("max_steps, top_k, passage_chars and prompt_chars must be >= 1")
        self.split, self.search_mode, self.format = split, search, action_format
        self.max_steps, self.top_k = max_steps, top_k
        self.passage_chars, self.prompt_chars = passage_chars, prompt_chars
        self.invalid_penalty = invalid_penalty
        self.system_prompt = SYSTEM[action_format]
        self.tools = [SEARCH_TOOL] if action_format == "tool" else None  # for the chat template (rollout.py)
        self.questions = load_questions(data_file(data_dir, split))
        if search == "corpus":
            cache_dir = cache_dir or os.path.join(os.environ.get("STEPPO_CACHE", os.path.expanduser("~/.cache/steppo")),
                                                  "hotpotqa")
            if corpus is not None:
                if not os.path.isfile(corpus):
                    raise ValueError('corpus %s does not exist; expected a JSONL file, one {"title": str, "text": '
                                     'str} per line' % corpus)
                self.index = corpus_index([corpus], lambda: jsonl_passages(corpus), cache_dir)
            else:  # the union of the paragraphs of the official files present (train + dev): one shared index
                folder = os.path.dirname(data_file(data_dir, split))
                paths = [p for p in (os.path.join(folder, FILES[s]) for s in ("train", "eval")) if os.path.isfile(p)]
                self.index = corpus_index(paths, lambda: file_passages(paths), cache_dir)
        self.done = True

    def __len__(self):
        return len(self.questions)

    def reset(self, seed):
        q = self.questions[seed % len(self.questions)]
        self.question, self.gold, self.support = q["question"], q["answer"], q["support"]
        self.task_id = "hotpotqa/%s/%s" % (self.split, q["id"])
        if self.search_mode == "distractor":  # the question's own paragraphs: a 10-document index
            self.docs = q["context"]
            self.index = bm25_index(["%s: %s" % d for d in self.docs])
        self.t, self.done, self.won, self.f1 = 0, False, False, 0.0
        self.queries, self.found, self.passages, self.error = [], set(), [], None
        return "Question: %s\n%s" % (self.question, HINT[self.format]), self._info(False)

    def search(self, query):
        """[(title, text clipped to passage_chars)] of the top_k passages for `query`."""
        hits = bm25_top(self.index, query, self.top_k)
        found = [self.docs[i] for i in hits] if self.search_mode == "distractor" else \
            [(p["title"], p["text"]) for p in (self.index.corpus[i] for i in hits)]
        n = self.passage_chars
        return [(title, text if len(text) <= n else text[:max(n - 3, 0)] + "...") for title, text in found]

    def step(self, response):
        if self.done:
            raise RuntimeError("step() called after the episode ended; call reset(seed) first")
        self.t += 1
        name, arg = (parse_tag if self.format == "tag" else parse_tool)(response)
        if name is not None and len(arg) > MAX_ARG:
            name, arg = None, "the %s is over %d characters" % ("query" if name == "search" else "answer", MAX_ARG)
        reward, self.error = 0.0, None
        if name is None:
            obs = self.error = "Invalid response: %s. %s" % (arg, HINT[self.format])
            reward = -float(self.invalid_penalty) if self.invalid_penalty else 0.0  # never -0.0
        elif name == "search":
            hits = self.search(arg)
            self.queries.append(arg)
            self.found.update(title for title, _ in hits)
            self.passages += [h for h in hits if h not in self.passages]
            obs = "\n".join("[%d] %s: %s" % (i, t, x) for i, (t, x) in enumerate(hits, 1)) if hits else \
                "No results for \"%s\"." % arg[:80]
        else:
            self.won, self.f1 = normalize_answer(arg) == normalize_answer(self.gold), f1_score(arg, self.gold)
            reward, self.done = float(self.won), True
            obs = "Correct." if self.won else "Wrong answer."
        self.done = self.done or self.t >= self.max_steps
        info = self._info(name is None)
        info["truncated"] = self.done and name != "answer"
        return obs, reward, self.done, info

    def _expert(self):
        searched = {q.lower() for q in self.queries}
        for title in self.support:  # each supporting paragraph not yet seen in a result, then the answer
            if title not in self.found and " ".join(title.split()).lower() not in searched:
                return self._action("search", title)
        return self._action("answer", self.gold)

    def _action(self, name, arg):
        if self.format == "tag":
            return "<action>%s[%s]</action>" % (name, arg)
        if name == "answer":
            return "<answer>%s</answer>" % arg
        return "<tool_call>\n%s\n</tool_call>" % json.dumps({"name": "search", "arguments": {"query": arg}},
                                                             ensure_ascii=False)

    def _info(self, invalid):
        return dict(task_id=self.task_id, won=self.won, invalid=invalid, admissible=None,
                    expert=None if self.done else self._expert(), prompt=self.render_prompt(), step=self.t, f1=self.f1)

    def render_prompt(self):
        """Self-contained user message: question, searches so far, passages found (newest kept within
        prompt_chars), the last error, the action format."""
        lines = ["Question: %s" % self.question, "Steps taken: %d of %d." % (self.t, self.max_steps)]
        if self.queries:
            lines.append("Searches so far: " + "; ".join('"%s"' % q for q in self.queries))
        kept, used = [], 0
        for title, text in reversed(self.passages):
            line = "- %s: %s" % (title, text)
            if used + len(line) > self.prompt_chars:
                break
            kept.append(line)
            used += len(line)
        if self.passages:
            left_out = len(self.passages) - len(kept)
            lines += ["Passages found%s:" % (" (%d older ones left out)" % left_out if left_out else "")] + kept[::-1]
        if self.error:
            lines.append("Last response: " + self.error)
        return "\n".join(lines + [HINT[self.format]])


# ---------------------------------------------------------------- offline sample in the official format
RELATION_SENTENCES = {"built_by": "%s was built by %s.", "founder": "%s was founded by %s.",
                      "mentor": "%s was mentored by %s.", "hometown": "%s was born in %s."}


def _paragraph(kb, name):
    """The fact card of `name` as sentences (official style: sentences after the first start with a space)."""
    rels = [r for r in kb[name] if r in RELATION_SENTENCES]
    return ["%s is a %s." % (name, kb[name]["type"])] + [" " + RELATION_SENTENCES[r] % (name, kb[name][r])
                                                         for r in rels]


def make_sample(folder, kb_seed=0, n_paragraphs=10):
    """Write FILES["train"] and FILES["eval"] into `folder`: one question per 2-4 hop chain of envs/multihop.py's
    knowledge base, supporting facts on the chain's cards, distractor cards up to n_paragraphs; 3/4 train, 1/4 dev
    (disjoint questions, as multihop's splits). Deterministic; returns {split: number of questions}."""
    kb = multihop.build_kb(kb_seed)
    chains = multihop.all_chains(kb)
    random.Random(kb_seed + 1).shuffle(chains)
    rng, n_dev, sizes = random.Random(kb_seed + 2), max(1, len(chains) // 4), {}
    os.makedirs(folder, exist_ok=True)
    for split, part in (("eval", chains[:n_dev]), ("train", chains[n_dev:])):
        rows = []
        for start, rels in part:
            path = [start]
            for r in rels:
                path.append(kb[path[-1]][r])
            support = list(dict.fromkeys(path[:-1]))  # the cards that state each hop (the last names the answer)
            titles = support + rng.sample([n for n in sorted(kb) if n not in support], n_paragraphs - len(support))
            rng.shuffle(titles)
            facts = [[name, 1 + [r for r in kb[name] if r in RELATION_SENTENCES].index(rel)]
                     for name, rel in zip(path, rels)]
            rows.append({"_id": hashlib.sha1(("%s/%s" % (start, "/".join(rels))).encode()).hexdigest()[:24],
                         "question": multihop.question(start, rels), "answer": path[-1], "supporting_facts": facts,
                         "context": [[t, _paragraph(kb, t)] for t in titles], "type": "bridge",
                         "level": {2: "easy", 3: "medium"}.get(len(rels), "hard")})
        with open(os.path.join(folder, FILES[split]), "w", encoding="utf-8") as f:
            json.dump(rows, f)
        sizes[split] = len(rows)
    return sizes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="HotpotQA env tools.")
    parser.add_argument("--make-sample", metavar="DIR", required=True,
                        help="write a small offline sample with the official file names into DIR")
    args = parser.parse_args()
    print("wrote", make_sample(args.make_sample), "questions to", args.make_sample)
