"""HotpotQA env: the official-format loader, BM25 search (both settings), both action formats, the expert, tools
through a chat template, and train.py end to end, all on a sample generated offline (`make_sample`)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import envs
import train
from conftest import ROOT, forward_logprobs, metric_rows
from envs import hotpotqa
from envs.hotpotqa import FILES, SEARCH_TOOL, f1_score, normalize_answer, parse_tool
from rollout import HFEngine, collect, first_prompt, observation_role
from step_mdp import packable

# A Qwen2.5-Instruct-style chat template (tools in the system turn, tool messages as <tool_response> in a user turn)
QWEN_TOOLS_TEMPLATE = (  # newlines only inside {{ '...' }}: transformers renders with trim_blocks, as Qwen's own
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are a helpful assistant.' }}"
    "{%- endif %}{{- '\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML "
    "tags:\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) or m.role == 'assistant' %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# An entry in the official schema (the first dev question; paragraph texts abbreviated)
OFFICIAL = {
    "_id": "5a8b57f25542995d1e6f1371", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
    "answer": "yes", "type": "comparison", "level": "hard",
    "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
    "context": [["Ed Wood (film)", ["Ed Wood is a 1994 American biographical period comedy-drama film directed and "
                                    "produced by Tim Burton.", " It stars Johnny Depp as cult filmmaker Ed Wood."]],
                ["Scott Derrickson", ["Scott Derrickson (born July 16, 1966) is an American director, screenwriter "
                                      "and producer.", " He lives in Los Angeles, California."]],
                ["Woodson, Arkansas", ["Woodson is a census-designated place in Pulaski County, Arkansas."]],
                ["Ed Wood", ["Edward Davis Wood Jr. (October 10, 1924 - December 10, 1978) was an American "
                             "filmmaker, actor, writer, producer, and director."]]]}
BAD = ["", "   ", "search[foo]", "<action></action>", "<action>search[]</action>", "<action>fly</action>",
       "x" * 10_000, "<action>search[" + "y" * 10_000 + "]</action>", "<answer>" + "z" * 10_000 + "</answer>",
       "<tool_call>{\"name\": \"search\", \"arguments\": {\"query\": \"a\"</tool_call>", "<tool_call></tool_call>",
       "<tool_call>{\"name\": \"lookup\", \"arguments\": {\"query\": \"Halo Mini\"}}</tool_call>",
       "<tool_call>{\"name\": \"search\", \"arguments\": {\"query\": \"  \"}}</tool_call>",
       "<tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call>", "<tool_call>[1, 2]</tool_call>",
       "<tool_call>{'name': 'search', 'arguments': {'query': __import__('os')}}</tool_call>",
       "<tool_call>" + "[" * 10_000 + "</tool_call>", "<answer> </answer>", "\x00\udcff<tool_call>\t</tool_call>",
       "<tool_call>{\"name\": \"search\", \"arguments\": {\"query\": \"" + "q" * 10_000 + "\"}}</tool_call>"]


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hotpotqa"))
    assert hotpotqa.make_sample(folder) == {"train": 111, "eval": 37}
    return folder


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hotpotqa-cache"))


def play_expert(env, seed):
    obs, info = env.reset(seed)
    done, steps, reward = False, 0, 0.0
    while not done:
        obs, reward, done, info = env.step(info["expert"])
        steps += 1
        assert not info["invalid"]
    return info, reward, steps


# ---------------------------------------------------------------- data
def test_sample_is_in_the_official_schema_and_deterministic(sample, tmp_path):
    rows = {s: json.load(open(os.path.join(sample, f))) for s, f in FILES.items()}
    for split, entries in rows.items():
        for e in entries:
            assert set(e) >= {"_id", "question", "answer", "supporting_facts", "context"} and len(e["_id"]) == 24
            titles = [t for t, _ in e["context"]]
            assert len(titles) == len(set(titles)) == 10 and all(isinstance(s, list) for _, s in e["context"])
            sents = dict(e["context"])
            for title, i in e["supporting_facts"]:  # every fact is a sentence of a context paragraph
                assert title in sents and 0 < i < len(sents[title]) and title in sents[title][i]
            last_title, last_i = e["supporting_facts"][-1]
            assert sents[last_title][last_i].rstrip(".").endswith(e["answer"])  # the last hop names the answer
    assert not {e["_id"] for e in rows["train"]} & {e["_id"] for e in rows["eval"]}
    assert not {e["question"] for e in rows["train"]} & {e["question"] for e in rows["eval"]}
    r = subprocess.run([sys.executable, "-m", "envs.hotpotqa", "--make-sample", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)  # the documented command writes the same files
    assert r.returncode == 0 and "111" in r.stdout, r.stderr
    for f in FILES.values():
        assert open(os.path.join(sample, f)).read() == open(tmp_path / f).read()


def test_loader_reads_an_official_entry(tmp_path):
    for f in FILES.values():
        json.dump([OFFICIAL], open(tmp_path / f, "w"))
    env = envs.make("hotpotqa", data_dir=str(tmp_path), split="eval")
    obs, info = env.reset(0)
    assert "Scott Derrickson and Ed Wood" in obs and info["task_id"] == "hotpotqa/eval/5a8b57f25542995d1e6f1371"
    assert env.support == ["Scott Derrickson", "Ed Wood"] and env.gold == "yes"
    assert env.docs[1] == ("Scott Derrickson", "Scott Derrickson (born July 16, 1966) is an American director, "
                           "screenwriter and producer. He lives in Los Angeles, California.")
    assert [t for t, _ in env.search("Ed Wood")][:2] == ["Ed Wood (film)", "Ed Wood"]  # BM25: the film says it twice
    info, reward, steps = play_expert(env, 0)
    assert info["won"] and reward == 1.0 and info["f1"] == 1.0 and steps == 3


def test_data_errors_are_clear(sample, tmp_path, monkeypatch):
    monkeypatch.delenv("HOTPOTQA_DATA", raising=False)
    with pytest.raises(ValueError, match=r"HOTPOTQA_DATA.*curtis\.ml\.cmu\.edu.*--make-sample"):
        envs.make("hotpotqa")
    monkeypatch.setenv("HOTPOTQA_DATA", sample)  # the environment variable works like data_dir
    assert len(envs.make("hotpotqa", split="eval")) == 37
    half = tmp_path / "half"
    half.mkdir()
    os.symlink(os.path.join(sample, FILES["train"]), half / FILES["train"])
    with pytest.raises(ValueError, match="split='eval'.*half/hotpot_dev_distractor_v1.json does not exist"):
        envs.make("hotpotqa", data_dir=str(half), split="eval")
    bad = {"not json": "[{", "a dict": '{"data": []}', "empty": "[]",
           "no supporting facts": json.dumps([OFFICIAL, {k: v for k, v in OFFICIAL.items()
                                                         if k != "supporting_facts"}]),
           "HF-style context": json.dumps([{**OFFICIAL, "context": {"title": ["A"], "sentences": [["x"]]}}])}
    messages = ["cannot be read as JSON", "not a HotpotQA file", "not a HotpotQA file", "entry 1 .*'supporting_facts'",
                "entry 0 .*'context'"]
    for (name, text), message in zip(bad.items(), messages):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / FILES["train"]).write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            envs.make("hotpotqa", data_dir=str(folder))
        assert str(folder / FILES["train"]) in str(e.value) and '"supporting_facts"' in str(e.value)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"title": "A", "text": "a b"}\n{"title": "B"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 2: expected one JSON object"):
        envs.make("hotpotqa", data_dir=sample, search="corpus", corpus=str(corpus), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="nowhere.jsonl does not exist"):
        envs.make("hotpotqa", data_dir=sample, search="corpus", corpus=str(tmp_path / "nowhere.jsonl"))
    for kw in (dict(split="test"), dict(search="dense"), dict(action_format="json"), dict(corpus=str(corpus)),
               dict(top_k=0)):
        with pytest.raises(ValueError):
            envs.make("hotpotqa", data_dir=sample, **kw)


# ---------------------------------------------------------------- answers and search
def test_official_answer_normalisation_and_f1():
    assert normalize_answer("  The Beatles!") == "beatles" and normalize_answer("A.B.C. an apple") == "abc apple"
    assert f1_score("the Big Apple", "Big Apple City") == pytest.approx(0.8)
    assert f1_score("yes", "no") == 0.0 and f1_score("no", "no.") == 1.0
    assert f1_score("yes it is", "yes") == 0.0  # yes / no / noanswer must match exactly
    assert f1_score("Paris", "London") == 0.0


def test_bm25_title_query_ranks_its_paragraph_first(sample, cache, tmp_path):
    env = envs.make("hotpotqa", data_dir=sample)
    for seed in range(len(env)):
        env.reset(seed)
        for title, _ in env.docs:
            hits = env.search(title)
            assert hits[0][0] == title and 1 <= len(hits) <= env.top_k
        assert env.search("the of and") == [] and env.search("Zzyzx Qwertyuiop") == []
    union = hotpotqa.file_passages([os.path.join(sample, f) for f in FILES.values()])
    corpus = tmp_path / "corpus.jsonl"  # a user corpus: the same paragraphs plus noise, sentences as a list
    with open(corpus, "w") as f:
        for p in union:
            f.write(json.dumps({"title": p["title"], "text": [p["text"]]}) + "\n\n")
        for i in range(200):
            noise = {"title": "Noise %d" % i, "text": "A company founded by nobody, built in %d." % i}
            f.write(json.dumps(noise) + "\n")
    for kw in (dict(), dict(corpus=str(corpus))):
        env = envs.make("hotpotqa", data_dir=sample, search="corpus", cache_dir=cache, top_k=3, **kw)
        assert env.index.scores["num_docs"] == len(union) + (200 if kw else 0) and len(union) == 26
        for p in union:
            hits = env.search(p["title"])
            assert hits[0] == (p["title"], p["text"]) and len(hits) <= 3


def test_corpus_index_is_built_once_and_cached_on_disk(sample, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    a = envs.make("hotpotqa", data_dir=sample, search="corpus", cache_dir=cache)
    b = envs.make("hotpotqa", data_dir=sample, search="corpus", cache_dir=cache, split="eval")
    folders = lambda: sorted(f for f in os.listdir(cache) if not f.endswith(".lock"))  # noqa: E731
    assert a.index is b.index and len(folders()) == 1 and folders()[0].startswith("bm25-")
    monkeypatch.setattr(hotpotqa, "_INDEXES", {})  # a new process: loads from disk, never rebuilds
    monkeypatch.setattr(hotpotqa, "build_corpus_index", lambda *a: pytest.fail("rebuilt a cached index"))
    c = envs.make("hotpotqa", data_dir=sample, search="corpus", cache_dir=cache)
    c.reset(0)
    a.reset(0)
    assert c.index is not a.index and c.search(c.support[0]) == a.search(a.support[0])
    monkeypatch.undo()
    os.utime(os.path.join(sample, FILES["eval"]), ns=(1, 1))  # a changed source file: a new index
    envs.make("hotpotqa", data_dir=sample, search="corpus", cache_dir=cache)
    assert len(folders()) == 2 and not [f for f in folders() if ".tmp" in f]  # no temp folders left behind


def test_concurrent_processes_build_the_index_once(sample, tmp_path):
    code = ("import time, envs, envs.hotpotqa as h; n = []; build = h.build_corpus_index\n"  # a slow build: overlap
            "h.build_corpus_index = lambda *a: n.append((time.sleep(2), build(*a)))\n"
            "envs.make('hotpotqa', data_dir=%r, search='corpus', cache_dir=%r); print('builds', len(n))"
            % (sample, str(tmp_path)))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and sorted(outs) == ["builds 0\n", "builds 1\n"]


# ---------------------------------------------------------------- episodes
@pytest.mark.parametrize("search,action_format", [("distractor", "tag"), ("distractor", "tool"), ("corpus", "tool")])
def test_expert_wins_every_generated_question(sample, cache, search, action_format):
    for split in ("train", "eval"):
        env = envs.make("hotpotqa", data_dir=sample, split=split, search=search, action_format=action_format,
                        cache_dir=cache)
        for seed in range(len(env)):
            info, reward, steps = play_expert(env, seed)
            assert info["won"] and reward == 1.0 and info["f1"] == 1.0 and not info["truncated"]
            assert 2 <= steps <= len(env.support) + 1 <= env.max_steps
            assert set(env.support) <= env.found  # every supporting paragraph was retrieved on the way


@pytest.mark.parametrize("action_format", ["tag", "tool"])
def test_bad_responses_are_invalid_steps(sample, action_format):
    env = envs.make("hotpotqa", data_dir=sample, action_format=action_format, max_steps=len(BAD) + 3,
                    invalid_penalty=0.1)
    obs, info = env.reset(4)
    good = info["expert"]
    other = hotpotqa.HINT["tool" if action_format == "tag" else "tag"]
    for bad in BAD + [other]:  # the other format's syntax is invalid too
        obs, reward, done, info = env.step(bad)
        assert info["invalid"] and not done and reward == -0.1 and obs.startswith("Invalid response")
        assert hotpotqa.HINT[action_format] in obs and info["expert"] == good
        assert "Last response: Invalid" in info["prompt"]
    obs, reward, done, info = env.step("Let me think. " + good)
    assert not info["invalid"] and obs.startswith("[1] ") and reward == 0.0 and "Last response" not in info["prompt"]
    obs, reward, done, info = env.step(("<answer>%s</answer>" if action_format == "tool" else
                                        "<action>answer[%s]</action>") % "definitely wrong")
    assert done and reward == 0.0 and not info["won"] and info["f1"] == 0.0 and info["expert"] is None
    assert not info["truncated"]
    with pytest.raises(RuntimeError):
        env.step(good)


def test_tool_calls_tolerate_small_model_mistakes():
    want = ("search", "Halo Mini")
    for text in ['<tool_call>\n{"name": "search", "arguments": {"query": "Halo  Mini"}}\n</tool_call>',
                 "<tool_call>{'name': 'search', 'arguments': {'query': 'Halo Mini'}}</tool_call>",  # Python dict
                 "<tool_call>{'name': 'search', 'arguments': {'query': 'Halo Mini', 'exact': True}}</tool_call>",
                 '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"Halo Mini\\"}"}</tool_call>',
                 '<tool_call>{"name": "search", "parameters": {"query": "Halo Mini"}}</tool_call>',  # Llama-3 style
                 '<think>first</think><answer>no</answer> then <tool_call>{"name": "search", "arguments": '
                 '{"query": "Halo Mini"}}</tool_call>']:
        assert parse_tool(text) == want, text
    assert parse_tool('<tool_call>{"name": "search", "arguments": {"query": "x"}}</tool_call><ANSWER> Lumen  Labs '
                      '</ANSWER>') == ("answer", "Lumen Labs")  # the last block counts


def test_truncation_determinism_splits_and_bounded_prompt(sample):
    env = envs.make("hotpotqa", data_dir=sample, max_steps=2, prompt_chars=150, passage_chars=40)
    obs, info = env.reset(5)
    obs, reward, done, info = env.step("<action>search[was]</action>")  # a stop word: no result, not invalid
    assert obs == 'No results for "was".' and not info["invalid"] and not done
    obs, reward, done, info = env.step("<action>search[person company product]</action>")
    assert done and info["truncated"] and not info["won"] and info["expert"] is None
    texts = [line.split(": ", 1)[1] for line in obs.split("\n")]
    assert len(texts) == env.top_k and all(len(t) <= 40 for t in texts) and any(t.endswith("...") for t in texts)
    passages = info["prompt"].split("Passages found")[1].split("\n")[1:-1]
    assert "older ones left out" in info["prompt"] and sum(map(len, passages)) <= 150 and passages
    assert passages[-1] == "- " + obs.split("\n")[-1].split("] ", 1)[1]  # the newest passage is kept
    a, b = envs.make("hotpotqa", data_dir=sample), envs.make("hotpotqa", data_dir=sample)
    assert [a.reset(s) for s in range(5)] == [b.reset(s) for s in range(5)]
    assert a.reset(3)[1]["task_id"] == a.reset(3 + len(a))[1]["task_id"]
    ev = envs.make("hotpotqa", data_dir=sample, split="eval")
    assert not {a.reset(s)[1]["task_id"] for s in range(len(a))} & {ev.reset(s)[1]["task_id"] for s in range(len(ev))}


# ---------------------------------------------------------------- tools through the chat template, and train.py
@pytest.fixture(scope="module")
def qwen_style(tiny):
    import copy
    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = QWEN_TOOLS_TEMPLATE
    return model, tok


def test_tools_reach_the_chat_template(sample, tiny, qwen_style):
    env = envs.make("hotpotqa", data_dir=sample, action_format="tool")
    _, tok = qwen_style
    text = tok.decode(first_prompt(tok, env.system_prompt, "Question?", env.tools))
    assert json.dumps(SEARCH_TOOL, ensure_ascii=False) in text and env.system_prompt in text
    assert observation_role(tok, env.tools) == "tool" and observation_role(tok, None) == "user"
    assert observation_role(tiny[1], env.tools) == "user"  # the tiny template ignores tools: plain user turns
    assert tok.decode(first_prompt(tiny[1], env.system_prompt, "Question?", env.tools)) == \
        tok.decode(first_prompt(tiny[1], env.system_prompt, "Question?"))


@pytest.mark.usefixtures("one_thread")
def test_collect_in_tool_mode_is_token_in_token_out(sample, tiny, qwen_style):
    model, tok = qwen_style
    pool = [envs.make("hotpotqa", data_dir=sample, action_format="tool") for _ in range(3)]
    demos = collect(None, pool, tok, [0, 1, 2], max_steps=5, max_new_tokens=8, temperature=0.0, expert=True,
                    max_len=4096)
    assert all(tr.success and tr.terminated and packable(tr) for tr in demos)
    for tr in demos:
        for a, b in zip(tr.steps, tr.steps[1:]):
            new = tok.decode(b.prompt_ids[len(a.prompt_ids) + len(a.action_ids):])
            assert new == ("\n<|im_start|>user\n<tool_response>\n%s\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n" % a.observation)
    for tk, context in ((tok, "full"), (tok, "window"), (tiny[1], "full")):
        trajs = collect(HFEngine(model, tk), pool[:2], tk, [3, 3], max_steps=3, max_new_tokens=12, temperature=1.0,
                        context=context, seed=0)
        for tr in trajs:
            assert context == "window" or packable(tr)
            for s in tr.steps:
                assert (json.dumps(SEARCH_TOOL) in tk.decode(s.prompt_ids)) == (tk is tok)
                ref = forward_logprobs(model, s.prompt_ids, s.action_ids)
                assert (ref - torch.tensor(s.engine_logprobs)).abs().max() < 1e-4


@pytest.mark.parametrize("kwargs,flags", [
    ({}, []),
    ({"action_format": "tool", "invalid_penalty": 0.1},  # a tool call is ~53 tokens with the tiny tokenizer
     ["--context", "window", "--estimator", "grpo", "--loss", "token", "--max-new-tokens", "64"])])
def test_train_runs_end_to_end(sample, tmp_path, kwargs, flags):
    from test_train import TINY
    out = str(tmp_path / "run")
    train.main(train.parse_config(TINY + ["--out", out, "--env", "hotpotqa", "--env-kwargs",
                                          json.dumps({"data_dir": sample, **kwargs}), *flags]))
    rows = metric_rows(out)
    assert [r["iter"] for r in rows] == [0, 1, 2] and 1 <= rows[0]["mean_steps"] <= 3
    assert all(0 <= r["eval_success_rate"] <= 1 for r in rows)
    assert os.path.exists(os.path.join(out, "final", "config.json"))


def test_train_without_data_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.delenv("HOTPOTQA_DATA", raising=False)
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--env", "hotpotqa"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--make-sample" in err and "hotpot_train_v1.1.json" in err
