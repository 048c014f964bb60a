"""credit.py against hand-worked numbers and slow, obviously-correct per-trajectory loops."""
import math
import random

import pytest
import torch

from credit import (explained_variance, gigpo, grpo, reinforce_pp, reinforce_pp_baseline, rloo, step_gae, token_gae,
                    token_gae_on_steps, whiten)


def ragged(N=7, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rewards = torch.randn(N, T, generator=g) * mask
    values = torch.randn(N, T, generator=g) * mask
    return rewards, values, mask, lengths


def slow_gae(rewards, values, gamma, lam, bootstrap):
    """Textbook GAE over one trajectory given as Python lists."""
    T = len(rewards)
    adv = [0.0] * T
    next_a, next_v = 0.0, bootstrap
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_v - values[t]
        next_a = delta + gamma * lam * next_a
        adv[t] = next_a
        next_v = values[t]
    return adv, [a + v for a, v in zip(adv, values)]


def test_step_gae_hand_worked():
    # trajectory 0: 3 steps, terminal. gamma=0.9, lam=0.8 (gamma*lam = 0.72)
    #   t=2: delta = 1 + 0 - 0.8 = 0.2                 A2 = 0.2
    #   t=1: delta = 0 + 0.9*0.8 - 0.6 = 0.12          A1 = 0.12 + 0.72*0.2 = 0.264
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04          A0 = 0.04 + 0.72*0.264 = 0.23008
    # trajectory 1: 2 steps, cut at the step limit, bootstrap V = 0.5
    #   t=1: delta = 0 + 0.9*0.5 - 0.4 = 0.05          A1 = 0.05
    #   t=0: delta = 1 + 0.9*0.4 - 0.2 = 1.16          A0 = 1.16 + 0.72*0.05 = 1.196
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.8], [0.2, 0.4, 9.9]])  # 9.9 sits on padding and must be ignored
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = step_gae(rewards, values, mask, 0.9, 0.8, bootstrap=torch.tensor([0.0, 0.5]))
    assert torch.allclose(adv, torch.tensor([[0.23008, 0.264, 0.2], [1.196, 0.05, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.73008, 0.864, 1.0], [1.396, 0.45, 0.0]]), atol=1e-6)


def test_step_gae_truncation_uses_bootstrap():
    rewards, values, mask = torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2)
    adv, _ = step_gae(rewards, values, mask, 0.5, 1.0, bootstrap=torch.tensor([4.0]))
    assert torch.allclose(adv, torch.tensor([[1.0, 2.0]]))  # 0.5^2 * 4 and 0.5 * 4
    adv0, _ = step_gae(rewards, values, mask, 0.5, 1.0)  # terminal: nothing to bootstrap
    assert torch.equal(adv0, torch.zeros(1, 2))


def test_step_gae_gamma_lam_one_is_reward_to_go():
    rewards, _, mask, _ = ragged(seed=1)
    adv, ret = step_gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    rtg = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask
    assert torch.allclose(adv, rtg, atol=1e-5) and torch.allclose(ret, rtg, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_step_gae_matches_slow_loop(seed):
    rewards, values, mask, lengths = ragged(N=9, T=8, seed=seed)
    boot = torch.randn(9, generator=torch.Generator().manual_seed(100 + seed))
    gamma, lam = 0.97, 0.9
    adv, ret = step_gae(rewards, values, mask, gamma, lam, bootstrap=boot)
    for i, n in enumerate(lengths.tolist()):
        a, r = slow_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam, boot[i].item())
        assert torch.allclose(adv[i, :n], torch.tensor(a), atol=1e-5)
        assert torch.allclose(ret[i, :n], torch.tensor(r), atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_token_gae_per_token_matches_slow_loop(seed):
    g = torch.Generator().manual_seed(seed)
    N, L = 6, 30
    mask = (torch.rand(N, L, generator=g) < 0.6).float()
    mask[0] = 0  # a trajectory with no action token at all
    rewards = torch.randn(N, L, generator=g) * mask
    values = torch.randn(N, L, generator=g)
    boot = torch.randn(N, generator=g)
    adv, ret = token_gae(rewards, values, mask, 0.99, 0.95, bootstrap=boot, per_token=True)
    for i in range(N):
        pos = mask[i].nonzero().flatten().tolist()
        a, r = slow_gae(rewards[i, pos].tolist(), values[i, pos].tolist(), 0.99, 0.95, boot[i].item())
        assert torch.allclose(adv[i, pos], torch.tensor(a), atol=1e-5)
        assert torch.allclose(ret[i, pos], torch.tensor(r), atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_whiten_matches_slow_loop_and_edges():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g) * 3 + 2
    mask = (torch.rand(5, 7, generator=g) < 0.5).float()
    vals = x[mask > 0].tolist()
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    out = whiten(x, mask)
    for i in range(5):
        for j in range(7):
            want = (x[i, j].item() - mean) / (std + 1e-8) if mask[i, j] else 0.0
            assert abs(out[i, j].item() - want) < 1e-5
    one = torch.zeros(3)
    one[1] = 1
    assert torch.equal(whiten(torch.tensor([5.0, 6.0, 7.0]), one), torch.zeros(3))
    assert torch.equal(whiten(torch.randn(4), torch.zeros(4)), torch.zeros(4))


def _whiten_half(rank, x, mask, port, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def all_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t
    half = slice(rank * 3, rank * 3 + 3)
    results.put((rank, whiten(x[half], mask[half], all_sum=all_sum)))
    dist.destroy_process_group()


def test_whiten_across_processes_equals_whiten_of_the_whole_batch():
    """Under DDP each process holds 3 of 6 trajectories; with all_sum the result is that of all 6 in one place."""
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(1)
    x, mask = torch.randn(6, 5, generator=g) * 2 + 1, (torch.rand(6, 5, generator=g) < 0.6).float()
    mask[0] = 1  # the two halves differ in size and in mean, so per-process whitening would differ
    x[3:] += 3
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = 29000 + random.randrange(500)
    procs = [ctx.Process(target=_whiten_half, args=(r, x, mask, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    whole = whiten(x, mask)
    assert torch.allclose(torch.cat([got[0], got[1]]), whole, atol=1e-6)
    assert not torch.allclose(got[0], whiten(x[:3], mask[:3]), atol=1e-3)  # and per process would not be


def slow_groups(scores, ids):
    groups = {}
    for i, k in enumerate(ids):
        groups.setdefault(k, []).append(i)
    return groups


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_slow_loop(norm):
    rnd = random.Random(0)
    ids = [rnd.randrange(5) for _ in range(40)] + [99]  # 99 is a group of one
    s = [rnd.choice([0.0, 1.0, rnd.random()]) for _ in ids]
    out = grpo(torch.tensor(s), torch.tensor(ids), std_normalize=norm)
    for k, members in slow_groups(s, ids).items():
        vals = [s[i] for i in members]
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for i in members:
            want = 0.0 if len(vals) == 1 else ((s[i] - m) / (sd + 1e-6) if norm else s[i] - m)
            assert abs(out[i].item() - want) < 1e-4


def test_grpo_hand_worked_and_equal_scores():
    out = grpo(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]))
    # mean 0.5, unbiased std sqrt(1/3) = 0.57735
    assert torch.allclose(out, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5)
    assert torch.equal(grpo(torch.ones(3), torch.zeros(3, dtype=torch.long)), torch.zeros(3))


def test_rloo_matches_slow_loop():
    rnd = random.Random(1)
    ids = [rnd.randrange(4) for _ in range(30)] + [7]
    s = [rnd.random() for _ in ids]
    out = rloo(torch.tensor(s), torch.tensor(ids))
    for k, members in slow_groups(s, ids).items():
        for i in members:
            others = [s[j] for j in members if j != i]
            want = s[i] - sum(others) / len(others) if others else 0.0
            assert abs(out[i].item() - want) < 1e-5
    assert torch.allclose(rloo(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3, 3, 3])),
                          torch.tensor([1.0, -0.5, -0.5]))


def slow_gigpo(rewards, lengths, group_ids, state_ids, gamma, w, eps=1e-6):
    N = len(lengths)
    totals = [sum(rewards[i][: lengths[i]]) for i in range(N)]
    episode = []
    for i in range(N):  # GRPO over each task's trajectories, written out
        mates = [totals[j] for j in range(N) if group_ids[j] == group_ids[i]]
        mean = sum(mates) / len(mates)
        sd = math.sqrt(sum((v - mean) ** 2 for v in mates) / (len(mates) - 1)) if len(mates) > 1 else 0.0
        episode.append((totals[i] - mean) / (sd + eps) if len(mates) > 1 else 0.0)
    G = {}
    for i in range(N):
        run = 0.0
        for t in reversed(range(lengths[i])):
            run = rewards[i][t] + gamma * run
            G[(i, t)] = run
    anchors = {}
    for (i, t), g in G.items():
        anchors.setdefault((group_ids[i], state_ids[i][t]), []).append((i, t))
    out = [[0.0] * len(rewards[0]) for _ in range(N)]
    for members in anchors.values():
        vals = [G[m] for m in members]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for (i, t) in members:
            step = (G[(i, t)] - mean) / (sd + eps) if len(vals) > 1 else 0.0
            out[i][t] = episode[i] + w * step
    return out


@pytest.mark.parametrize("seed", range(4))
def test_gigpo_matches_slow_loop(seed):
    rnd = random.Random(seed)
    N, T = 12, 5
    lengths = [rnd.randint(1, T) for _ in range(N)]
    group_ids = [rnd.randrange(3) for _ in range(N)]
    state_ids = [[rnd.randrange(3) for _ in range(T)] for _ in range(N)]
    rewards = [[(rnd.choice([0.0, 1.0]) if t < lengths[i] else 0.0) for t in range(T)] for i in range(N)]
    mask = torch.tensor([[1.0 if t < lengths[i] else 0.0 for t in range(T)] for i in range(N)])
    out = gigpo(torch.tensor(rewards), mask, torch.tensor(group_ids), torch.tensor(state_ids), 0.95, step_weight=0.7)
    want = slow_gigpo(rewards, lengths, group_ids, state_ids, 0.95, 0.7)
    assert torch.allclose(out, torch.tensor(want), atol=1e-4)
    assert (out[mask == 0] == 0).all()


def test_gamma_or_lam_zero():
    rewards, values, mask, _ = ragged(seed=3)
    adv, _ = step_gae(rewards, values, mask, 0.0, 0.9)  # gamma 0: one-step advantage r_t - V(s_t)
    assert torch.allclose(adv, (rewards - values) * mask)
    adv, _ = step_gae(rewards, values, mask, 0.9, 0.0, bootstrap=torch.ones(7))  # lam 0: the TD error
    v_next = torch.cat([values[:, 1:], torch.zeros(7, 1)], 1) * torch.cat([mask[:, 1:], torch.zeros(7, 1)], 1)
    last = (mask > 0) & (torch.cat([mask[:, 1:], torch.zeros(7, 1)], 1) == 0)
    v_next = torch.where(last, torch.ones_like(v_next), v_next)
    assert torch.allclose(adv, (rewards + 0.9 * v_next - values) * mask, atol=1e-6)


def test_integer_rewards_are_not_truncated():
    r, mask = torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.long)
    adv, _ = step_gae(r, torch.zeros(1, 2), mask, 0.9, 0.95)
    assert adv.is_floating_point() and torch.allclose(adv, torch.tensor([[0.855, 1.0]]))
    adv, _ = token_gae(r, torch.zeros(1, 2), mask, 0.9, 0.95, per_token=True)
    assert torch.allclose(adv, torch.tensor([[0.855, 1.0]]))
    adv, _ = token_gae(r, torch.zeros(1, 2), mask, 0.9, 0.95)  # one step of two tokens: no discount inside
    assert adv.is_floating_point() and torch.allclose(adv, torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(reinforce_pp(r, mask, 0.5), reinforce_pp(r.float(), mask.float(), 0.5))
    assert torch.allclose(reinforce_pp_baseline(torch.tensor([[0, 1], [0, 0]]), mask.expand(2, 2), torch.tensor([0, 0])),
                          torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) / math.sqrt(4 / 3), atol=1e-6)
    out = gigpo(torch.tensor([[0, 1], [1, 1]]), torch.ones(2, 2), torch.tensor([0, 0]), torch.tensor([[0, 1], [0, 1]]), 1.0)
    assert torch.allclose(out, gigpo(torch.tensor([[0.0, 1], [1, 1]]), torch.ones(2, 2), torch.tensor([0, 0]),
                                     torch.tensor([[0, 1], [0, 1]]), 1.0))
    assert whiten(torch.tensor([1, 2, 3]), torch.ones(3)).is_floating_point()


def test_nan_in_padding_stays_out():
    nan = float("nan")
    assert torch.allclose(whiten(torch.tensor([1.0, 2.0, nan]), torch.tensor([1.0, 1, 0])),
                          torch.tensor([-0.70710677, 0.70710677, 0.0]))
    adv, ret = step_gae(torch.tensor([[1.0, nan]]), torch.tensor([[0.5, nan]]), torch.tensor([[1.0, 0]]), 0.9, 0.9)
    assert torch.equal(adv, torch.tensor([[0.5, 0.0]])) and torch.equal(ret, torch.tensor([[1.0, 0.0]]))
    adv, ret = token_gae(torch.tensor([[1.0, nan]]), torch.tensor([[0.5, nan]]), torch.tensor([[1.0, 0]]), 0.9, 0.9)
    assert torch.equal(adv, torch.tensor([[0.5, 0.0]])) and torch.equal(ret, torch.tensor([[1.0, 0.0]]))
    out = gigpo(torch.tensor([[1.0, nan], [0.0, nan]]), torch.tensor([[1.0, 0], [1, 0]]), torch.tensor([0, 0]),
                torch.zeros(2, 2, dtype=torch.long), 1.0)
    assert torch.isfinite(out).all() and out[0, 0] > 0 > out[1, 0]


def test_credit_vectorised_over_a_million_steps():
    """Not a timing test: makes sure the vectorised path handles large N without per-trajectory work."""
    N, T = 50_000, 20
    r = torch.zeros(N, T)
    r[:, -1] = 1.0
    adv, _ = step_gae(r, torch.zeros(N, T), torch.ones(N, T), 1.0, 1.0)
    assert torch.equal(adv, torch.ones(N, T))


def slow_token_gae_per_step(rewards, values, mask, gamma, lam, bootstrap):
    """Token GAE over one row given as lists, written from the definition: consecutive action positions are
    one response; the discount between two action tokens is 1 inside a response and gamma (gamma * lam for
    the advantage) across a gap of environment tokens, and from the last action token to the bootstrap."""
    pos = [j for j, m in enumerate(mask) if m > 0]
    adv, ret = [0.0] * len(mask), [0.0] * len(mask)
    next_a, next_v, next_pos = 0.0, bootstrap, None
    for p in reversed(pos):
        same_step = next_pos is not None and next_pos == p + 1
        g, gl = (1.0, 1.0) if same_step else (gamma, gamma * lam)
        next_a = rewards[p] + g * next_v - values[p] + gl * next_a
        adv[p], ret[p] = next_a, next_a + values[p]
        next_v, next_pos = values[p], p
    return adv, ret


def test_token_gae_per_step_hand_worked():
    # two responses of 2 tokens, one environment token between; gamma 0.9, lam 0.8; reward 1 at the end
    #   t=4 (last token):           delta = 1 + 0.9*0 - 0.8 = 0.2        A4 = 0.2
    #   t=3 (inside the response):  delta = 0 + 0.8 - 0.7 = 0.1          A3 = 0.1 + 0.2 = 0.3
    #   t=1 (crosses the boundary): delta = 0 + 0.9*0.7 - 0.6 = 0.03     A1 = 0.03 + 0.72*0.3 = 0.246
    #   t=0 (inside):               delta = 0 + 0.6 - 0.5 = 0.1          A0 = 0.1 + 0.246 = 0.346
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 9.9, 0.7, 0.8]])  # 9.9 sits on the environment token and is ignored
    mask = torch.tensor([[1.0, 1, 0, 1, 1]])
    adv, ret = token_gae(rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(adv, torch.tensor([[0.346, 0.246, 0.0, 0.3, 0.2]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.846, 0.846, 0.0, 1.0, 1.0]]), atol=1e-6)
    adv, _ = token_gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1.0, 1, 0]]), 0.5, 1.0, torch.tensor([4.0]))
    assert torch.allclose(adv, torch.tensor([[2.0, 2.0, 0.0]]))  # one step to the bootstrap: gamma once, not twice


@pytest.mark.parametrize("seed", range(5))
def test_token_gae_per_step_matches_slow_loop(seed):
    g = torch.Generator().manual_seed(seed)
    N, L = 6, 30
    mask = (torch.rand(N, L, generator=g) < 0.6).float()
    mask[0] = 0
    rewards, values, boot = torch.randn(N, L, generator=g) * mask, torch.randn(N, L, generator=g), torch.randn(N, generator=g)
    adv, ret = token_gae(rewards, values, mask, 0.97, 0.9, bootstrap=boot)
    for i in range(N):
        a, r = slow_token_gae_per_step(rewards[i].tolist(), values[i].tolist(), mask[i].tolist(), 0.97, 0.9, boot[i].item())
        assert torch.allclose(adv[i], torch.tensor(a), atol=1e-5) and torch.allclose(ret[i], torch.tensor(r), atol=1e-5)


def test_token_gae_per_step_with_step_values_equals_step_gae():
    """If every token of a step carries its step's value, per-step token GAE gives each token its step's advantage."""
    rewards, values, mask, lengths = ragged(N=5, T=4, seed=7)
    boot = torch.randn(5, generator=torch.Generator().manual_seed(8))
    A = 3  # tokens per step, then one environment token
    tok_r, tok_v, tok_m = torch.zeros(5, 4, A + 1), values[:, :, None].expand(5, 4, A + 1).clone(), torch.zeros(5, 4, A + 1)
    tok_m[:, :, :A] = mask[:, :, None]
    tok_r[:, :, A - 1] = rewards
    adv, _ = token_gae(tok_r.view(5, -1), tok_v.view(5, -1), tok_m.view(5, -1), 0.9, 0.7, bootstrap=boot)
    step_adv, _ = step_gae(rewards, values, mask, 0.9, 0.7, bootstrap=boot)
    assert torch.allclose(adv.view(5, 4, A + 1)[:, :, :A], step_adv[:, :, None].expand(5, 4, A), atol=1e-5)



def test_token_gae_on_steps_gives_each_token_its_steps_gae_when_values_are_per_step():
    """The trainer's layout (N, T, A): ragged steps of 1-3 action tokens, each token carrying its step's value ->
    every action token gets its step's step_gae advantage and return; padding stays 0."""
    rewards, values, mask, _ = ragged(N=6, T=5, seed=3)
    n_tok = torch.randint(1, 4, (6, 5), generator=torch.Generator().manual_seed(4))
    tok_mask = (torch.arange(3)[None, None] < n_tok[..., None]).float() * mask[..., None]  # (N, T, A)
    boot = torch.randn(6, generator=torch.Generator().manual_seed(5))
    adv, ret = token_gae_on_steps(rewards, values[..., None] * tok_mask, tok_mask, 0.9, 0.8, bootstrap=boot)
    step_adv, step_ret = step_gae(rewards, values, mask, 0.9, 0.8, bootstrap=boot)
    assert torch.allclose(adv, step_adv[..., None] * tok_mask, atol=1e-5)
    assert torch.allclose(ret, step_ret[..., None] * tok_mask, atol=1e-5)


def test_whitened_rloo_equals_reinforce_pp_baseline_for_equal_groups():
    """RLOO = G / (G - 1) x (score - group mean) for groups of G: whitened over the batch, the scale cancels and it is
    REINFORCE++-baseline exactly (docs/method.md). With unequal groups the two differ."""
    g = torch.Generator().manual_seed(0)
    N, T, G = 12, 4, 4
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (N,), generator=g)[:, None]).float()
    rewards = (torch.rand(N, T, generator=g) < 0.3).float() * mask
    groups = torch.arange(N) // G
    score = rewards.sum(1)
    mean = torch.stack([score[groups == groups[i]].mean() for i in range(N)])
    loo = rloo(score, groups)
    assert torch.allclose(loo, G / (G - 1) * (score - mean), atol=1e-6)
    assert torch.allclose(whiten(loo[:, None] * mask, mask), reinforce_pp_baseline(rewards, mask, groups), atol=1e-5)
    uneven = torch.tensor([0] * 2 + [1] * 10)
    assert not torch.allclose(whiten(rloo(score, uneven)[:, None] * mask, mask),
                              reinforce_pp_baseline(rewards, mask, uneven), atol=1e-3)

def slow_whiten(vals):
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return [(v - mean) / (std + 1e-8) for v in vals]


def test_reinforce_pp_hand_worked():
    # gamma 0.5: G = [[0 + 0.5*1, 1], [1]] = [0.5, 1, 1]; mean 5/6, unbiased std sqrt(1/12) = 0.288675
    out = reinforce_pp(torch.tensor([[0.0, 1.0], [1.0, 7.0]]), torch.tensor([[1.0, 1], [1, 0]]), 0.5)
    assert torch.allclose(out, torch.tensor([[-1.154701, 0.577350], [0.577350, 0.0]]), atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_reinforce_pp_matches_slow_loop(seed):
    rewards, _, mask, lengths = ragged(N=8, T=6, seed=seed)
    out = reinforce_pp(rewards, mask, 0.9)
    G = []
    for i, n in enumerate(lengths.tolist()):
        for t in range(n):
            G.append(sum(0.9 ** (k - t) * rewards[i, k].item() for k in range(t, n)))
    want = iter(slow_whiten(G))
    for i, n in enumerate(lengths.tolist()):
        for t in range(6):
            assert abs(out[i, t].item() - (next(want) if t < n else 0.0)) < 1e-5


def test_reinforce_pp_baseline_hand_worked():
    # totals [1, 0, 1]; groups {0, 1} mean 0.5 -> [0.5, -0.5]; {2} alone -> 0. Per step: [.5, .5, -.5, -.5, 0]:
    # mean 0, unbiased std 0.5 -> [1, 1, -1, -1, 0]
    out = reinforce_pp_baseline(torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 5.0]]),
                                torch.tensor([[1.0, 1], [1, 1], [1, 0]]), torch.tensor([4, 4, 9]))
    assert torch.allclose(out, torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_reinforce_pp_baseline_matches_slow_loop(seed):
    rewards, _, mask, lengths = ragged(N=10, T=5, seed=seed)
    rnd = random.Random(seed)
    ids = [rnd.randrange(3) for _ in range(10)]
    out = reinforce_pp_baseline(rewards, mask, torch.tensor(ids))
    totals = [sum(rewards[i, :n].tolist()) for i, n in enumerate(lengths.tolist())]
    per_traj = []
    for i in range(10):
        mates = [totals[j] for j in range(10) if ids[j] == ids[i]]
        per_traj.append(totals[i] - sum(mates) / len(mates))
    want = iter(slow_whiten([per_traj[i] for i, n in enumerate(lengths.tolist()) for _ in range(n)]))
    for i, n in enumerate(lengths.tolist()):
        for t in range(5):
            assert abs(out[i, t].item() - (next(want) if t < n else 0.0)) < 1e-5


def test_explained_variance_hand_worked_and_slow_loop():
    # returns [1, 0, 1, 0] (var 0.25); values [1, 0, 0.5, 0.5]: residuals [0, 0, .5, -.5] (var 0.125) -> 0.5
    ret, mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 7.0]), torch.tensor([1.0, 1, 1, 1, 0])
    assert abs(explained_variance(torch.tensor([1.0, 0.0, 0.5, 0.5, -3.0]), ret, mask) - 0.5) < 1e-6
    assert abs(explained_variance(ret, ret, mask) - 1.0) < 1e-6 and abs(explained_variance(torch.full((5,), 0.3), ret, mask)) < 1e-6
    assert explained_variance(torch.zeros(3), torch.ones(3), torch.ones(3)) is None  # every return equal
    g = torch.Generator().manual_seed(0)
    v, r, m = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), (torch.rand(6, 5, generator=g) < 0.7).float()
    rs = [r[i, j].item() for i in range(6) for j in range(5) if m[i, j]]
    ds = [r[i, j].item() - v[i, j].item() for i in range(6) for j in range(5) if m[i, j]]
    pvar = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)  # noqa: E731
    assert abs(explained_variance(v, r, m) - (1 - pvar(ds) / pvar(rs))) < 1e-5
