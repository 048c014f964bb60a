"""steppo_loss.py against hand-worked numbers, slow loops, and the gradient properties the method relies on."""
import math

import pytest
import torch

from steppo_loss import (kl_k3, step_policy_loss, token_entropy, token_logprobs, token_policy_loss, truncated_is_weights,
                         value_loss)


def test_token_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 17, generator=g)
    ids = torch.randint(0, 17, (3, 9), generator=g)
    ref = torch.log_softmax(logits, -1)
    out = token_logprobs(logits, ids, chunk_tokens=10)  # force several chunks
    assert torch.equal(out[:, 0], torch.zeros(3))
    for b in range(3):
        for j in range(1, 9):
            assert abs(out[b, j].item() - ref[b, j - 1, ids[b, j]].item()) < 1e-5
    # gradient agrees with the naive formula
    lg = logits.clone().requires_grad_(True)
    token_logprobs(lg, ids, chunk_tokens=10).sum().backward()
    lg2 = logits.clone().requires_grad_(True)
    torch.log_softmax(lg2[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum().backward()
    assert torch.allclose(lg.grad, lg2.grad, atol=1e-5)
    for chunk in (None, 1, 3, 100):  # the default, chunks inside one row, whole rows
        assert torch.equal(token_logprobs(logits, ids, chunk_tokens=chunk), out)
    out64 = token_logprobs(logits.double(), ids)  # fp64 logits keep fp64; bf16 ones are computed in fp32
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), out, atol=1e-6)
    assert token_logprobs(logits.bfloat16(), ids).dtype == torch.float32


def test_token_entropy_uniform():
    ent = token_entropy(torch.zeros(2, 3, 8))
    assert torch.allclose(ent, torch.full((2, 3), math.log(8)), atol=1e-6)


def test_step_loss_hand_worked():
    # row 0: lp - old = [0.1, 0.3] -> log r = 0.2, r = 1.2214 > 1.2; A = +1 -> min(1.2214, 1.2) = 1.2 -> l = -1.2
    # row 1: lp - old = [-0.5, -0.5] -> r = 0.6065 < 0.8; A = -2 -> min(-1.2131, -1.6) = -1.6 -> l = +1.6
    # row 2: no action token: ignored.  loss = (-1.2 + 1.6) / 2 = 0.2, both rows clipped.
    old = torch.zeros(3, 4)
    lp = torch.tensor([[0.0, 0.1, 0.3, 0.0], [0.0, -0.5, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    loss, stats = step_policy_loss(lp, old, torch.tensor([1.0, -2.0, 5.0]), mask, 0.2, 0.2)
    assert abs(loss.item() - 0.2) < 1e-6
    assert stats["clipfrac"] == 1.0
    want_kl = ((math.exp(0.2) - 1 - 0.2) + (math.exp(-0.5) - 1 + 0.5)) / 2
    assert abs(stats["approx_kl"] - want_kl) < 1e-6


def slow_step_loss(lp, old, adv, mask, cl, ch, w=None):
    total, n = 0.0, 0
    for b in range(lp.shape[0]):
        toks = [j for j in range(lp.shape[1]) if mask[b, j] > 0]
        if not toks:
            continue
        log_r = sum(lp[b, j].item() - old[b, j].item() for j in toks) / len(toks)
        r = math.exp(log_r)
        a = adv[b].item()
        total += -min(r * a, min(max(r, 1 - cl), 1 + ch) * a) * (1.0 if w is None else w[b].item())
        n += 1
    return total / max(n, 1)


def slow_token_loss(lp, old, adv, mask, cl, ch, c=None, w=None):
    total, n = 0.0, 0
    for b in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            if mask[b, j] > 0:
                r = math.exp(lp[b, j].item() - old[b, j].item())
                a = adv[b, j].item()
                term = -min(r * a, min(max(r, 1 - cl), 1 + ch) * a)
                if c is not None and a < 0:
                    term = min(term, -c * a)  # dual clip: a negative-advantage term never exceeds c |A|
                total += term * (1.0 if w is None else w[b, j].item())
                n += 1
    return total / max(n, 1)


@pytest.mark.parametrize("seed", range(5))
def test_policy_losses_match_slow_loops(seed):
    g = torch.Generator().manual_seed(seed)
    B, L = 8, 12
    lp, old = -torch.rand(B, L, generator=g) * 3, -torch.rand(B, L, generator=g) * 3
    mask = (torch.rand(B, L, generator=g) < 0.5).float()
    mask[0] = 0
    adv_row, adv_tok = torch.randn(B, generator=g), torch.randn(B, L, generator=g)
    loss, _ = step_policy_loss(lp, old, adv_row, mask, 0.2, 0.28)
    assert abs(loss.item() - slow_step_loss(lp, old, adv_row, mask, 0.2, 0.28)) < 1e-5
    loss, _ = token_policy_loss(lp, old, adv_tok, mask, 0.2, 0.28)
    assert abs(loss.item() - slow_token_loss(lp, old, adv_tok, mask, 0.2, 0.28)) < 1e-5


def test_step_loss_with_one_token_steps_equals_token_loss():
    g = torch.Generator().manual_seed(3)
    B, L = 10, 6
    old = -torch.rand(B, L, generator=g)
    base = old + 0.4 * torch.randn(B, L, generator=g)  # some ratios fall outside the clip range
    mask = torch.zeros(B, L)
    mask[torch.arange(B), torch.randint(1, L, (B,), generator=g)] = 1.0  # exactly one action token per row
    adv = torch.randn(B, generator=g)
    lp1, lp2 = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    l1, s1 = step_policy_loss(lp1, old, adv, mask, 0.2, 0.2)
    l2, s2 = token_policy_loss(lp2, old, adv[:, None].expand(B, L), mask, 0.2, 0.2)
    l1.backward()
    l2.backward()
    assert torch.allclose(l1, l2, atol=1e-6) and torch.allclose(lp1.grad, lp2.grad, atol=1e-6)
    assert abs(s1["clipfrac"] - s2["clipfrac"]) < 1e-6 and 0 < s1["clipfrac"] < 1


def test_step_clipped_in_advantage_direction_has_zero_gradient():
    old = torch.zeros(4, 3)
    lp = torch.tensor([[0.5, 0.5, 0.5],     # r = e^0.5 > 1.2, A > 0: clipped -> no gradient
                       [-0.5, -0.5, -0.5],  # r < 0.8, A < 0: clipped -> no gradient
                       [0.5, 0.5, 0.5],     # r > 1.2 but A < 0: pessimistic term is unclipped -> gradient
                       [0.05, 0.0, -0.05]], requires_grad=True)  # inside the range -> gradient
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, _ = step_policy_loss(lp, old, adv, torch.ones(4, 3), 0.2, 0.2)
    loss.backward()
    assert torch.equal(lp.grad[0], torch.zeros(3)) and torch.equal(lp.grad[1], torch.zeros(3))
    assert (lp.grad[2] != 0).all() and (lp.grad[3] != 0).all()
    # every token of an unclipped step gets the same share: d/d lp_j of mean(lp) = 1/n
    assert torch.allclose(lp.grad[3], lp.grad[3][0].expand(3))


def test_losses_nan_free_on_empty_rows_and_zero_advantages():
    lp = torch.tensor([[0.0, -80.0, 70.0]], requires_grad=True)  # extreme ratios must not overflow
    old = torch.zeros(1, 3)
    for mask in (torch.zeros(1, 3), torch.ones(1, 3)):
        loss, stats = step_policy_loss(lp, old, torch.zeros(1), mask, 0.2, 0.2)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        assert all(math.isfinite(v) for v in stats.values())
        loss, stats = token_policy_loss(lp, old, torch.zeros(1, 3), mask, 0.2, 0.2)
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    assert value_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.zeros(2), 0.2).item() == 0.0
    assert kl_k3(torch.zeros(2), torch.zeros(2), torch.zeros(2)).item() == 0.0


def test_nan_outside_the_mask_stays_out():
    nan = float("nan")
    lp, old = torch.tensor([[-1.0, nan]], requires_grad=True), torch.tensor([[-1.2, nan]])
    mask, A = torch.tensor([[1.0, 0.0]]), torch.tensor([1.0])
    loss, stats = step_policy_loss(lp, old, A, mask, 0.2, 0.2)
    want, _ = step_policy_loss(lp[:, :1], old[:, :1], A, mask[:, :1], 0.2, 0.2)
    assert torch.equal(loss, want) and all(math.isfinite(v) for v in stats.values())
    loss, _ = token_policy_loss(lp, old, torch.ones(1, 2), mask, 0.2, 0.2)
    assert torch.isfinite(loss)
    assert torch.isfinite(kl_k3(lp, old, mask))
    assert value_loss(torch.tensor([1.0, nan]), torch.zeros(2), torch.zeros(2), mask[0], 0.2).item() == 0.5


def test_value_loss_hand_worked_and_slow_loop():
    # v=1.0, old=0.0, R=0.5, clip 0.2: unclipped (0.5)^2 = 0.25, clipped (0.2 - 0.5)^2 = 0.09 -> max 0.25
    # v=0.1, old=0.0, R=1.0: unclipped 0.81, clipped (0.1 - 1)^2 = 0.81 -> 0.81; third entry masked out
    v, old, R = torch.tensor([1.0, 0.1, 5.0]), torch.zeros(3), torch.tensor([0.5, 1.0, 0.0])
    assert abs(value_loss(v, old, R, torch.tensor([1.0, 1.0, 0.0]), 0.2).item() - 0.5 * (0.25 + 0.81) / 2) < 1e-6
    g = torch.Generator().manual_seed(0)
    v, old, R = torch.randn(20, generator=g), torch.randn(20, generator=g), torch.randn(20, generator=g)
    m = (torch.rand(20, generator=g) < 0.7).float()
    want = [max((v[i] - R[i]) ** 2, (old[i] + min(max(v[i] - old[i], -0.3), 0.3) - R[i]) ** 2).item()
            for i in range(20) if m[i]]
    assert abs(value_loss(v, old, R, m, 0.3).item() - 0.5 * sum(want) / len(want)) < 1e-5


def test_kl_k3_slow_loop_and_nonnegative():
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(4, 5, generator=g) * 2, -torch.rand(4, 5, generator=g) * 2
    m = (torch.rand(4, 5, generator=g) < 0.6).float()
    vals = [math.exp(ref[i, j] - lp[i, j]) - (ref[i, j] - lp[i, j]).item() - 1
            for i in range(4) for j in range(5) if m[i, j]]
    out = kl_k3(lp, ref, m)
    assert abs(out.item() - sum(vals) / len(vals)) < 1e-5 and out.item() >= 0
    assert kl_k3(lp, lp, m).item() == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_dual_clip_and_is_weights_match_slow_loops(seed):
    g = torch.Generator().manual_seed(seed)
    B, L = 8, 10
    old = -torch.rand(B, L, generator=g) * 3
    lp = old + torch.randn(B, L, generator=g) * 2  # ratios up to e^6: many beyond the dual clip c = 3
    mask = (torch.rand(B, L, generator=g) < 0.6).float()
    adv_tok, adv_row = torch.randn(B, L, generator=g), torch.randn(B, generator=g)
    w_tok, w_row = torch.rand(B, L, generator=g) * 2, torch.rand(B, generator=g) * 2
    loss, st = token_policy_loss(lp, old, adv_tok, mask, 0.2, 0.28, clip_c=3.0)
    assert abs(loss.item() - slow_token_loss(lp, old, adv_tok, mask, 0.2, 0.28, c=3.0)) < 1e-5 and st["dual_clipfrac"] > 0
    loss, _ = token_policy_loss(lp, old, adv_tok, mask, 0.2, 0.28, clip_c=3.0, is_weight=w_tok)
    assert abs(loss.item() - slow_token_loss(lp, old, adv_tok, mask, 0.2, 0.28, c=3.0, w=w_tok)) < 1e-5
    loss, _ = step_policy_loss(lp, old, adv_row, mask, 3e-4, 4e-4, is_weight=w_row)
    assert abs(loss.item() - slow_step_loss(lp, old, adv_row, mask, 3e-4, 4e-4, w=w_row)) < 1e-5


def test_dual_clip_bounds_a_negative_advantage_token():
    """A = -2 with ratio e^10: plain PPO pays r |A| = 44053; with dual clip c = 10 the term is 10 |A| = 20 and has
    no gradient; positive advantages are untouched."""
    lp = torch.tensor([[10.0, 10.0]], requires_grad=True)
    adv, mask = torch.tensor([[-2.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    plain, _ = token_policy_loss(lp, torch.zeros(1, 2), adv, mask, 0.2, 0.28)
    dual, st = token_policy_loss(lp, torch.zeros(1, 2), adv, mask, 0.2, 0.28, clip_c=10.0)
    assert abs(plain.item() - 2 * math.exp(10)) < 1e-2 and dual.item() == 20.0 and st["dual_clipfrac"] == 1.0
    dual.backward()
    assert torch.equal(lp.grad, torch.zeros(1, 2))
    mask = torch.tensor([[0.0, 1.0]])  # A = +1, r = e^10: the ordinary clip gives -(1 + 0.28)
    dual, _ = token_policy_loss(lp, torch.zeros(1, 2), adv, mask, 0.2, 0.28, clip_c=10.0)
    assert abs(dual.item() + 1.28) < 1e-6


def test_truncated_is_weights_hand_worked():
    old = torch.tensor([[0.0, -1.0, -1.0, 0.0]])
    eng = torch.tensor([[5.0, -1.5, -0.5, 0.0]])  # padding at 0 is ignored through the mask
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, eng, mask, cap=2.0, per_step=False)
    assert torch.allclose(w[0, 1:3], torch.tensor([math.exp(0.5), math.exp(-0.5)]), atol=1e-6)
    w = truncated_is_weights(old, eng + torch.tensor([[0.0, -2.0, 0.0, 0.0]]), mask, cap=2.0, per_step=False)
    assert abs(w[0, 1].item() - 2.0) < 1e-6  # e^2.5 truncated at the cap
    assert torch.allclose(truncated_is_weights(old, eng, mask, 2.0, per_step=True), torch.tensor([1.0]))  # mean 0


def test_kl_k3_terms_are_clamped_like_low_var_kl():
    # ref - lp = 5: exp(5) - 5 - 1 = 142.4 -> clamped at 10; ref - lp = -5: e^-5 + 5 - 1 = 4.0067 stays
    out = kl_k3(torch.tensor([[0.0, 0.0]]), torch.tensor([[5.0, -5.0]]), torch.ones(1, 2))
    assert abs(out.item() - (10.0 + math.exp(-5) + 4) / 2) < 1e-5


@pytest.mark.parametrize("seed", range(3))
def test_token_loss_seq_mean_token_mean_matches_slow_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, L = 7, 9
    old = -torch.rand(B, L, generator=g) * 2
    lp = old + torch.randn(B, L, generator=g) * 0.5
    mask = (torch.rand(B, L, generator=g) < 0.5).float()
    mask[2] = 0  # a row without tokens does not count
    adv = torch.randn(B, L, generator=g)
    rows = []
    for b in range(B):
        toks = [j for j in range(L) if mask[b, j] > 0]
        if toks:
            rows.append(slow_token_loss(lp[b:b + 1], old[b:b + 1], adv[b:b + 1], mask[b:b + 1], 0.2, 0.28, c=10.0))
    loss, _ = token_policy_loss(lp, old, adv, mask, 0.2, 0.28, clip_c=10.0, seq_mean=True)
    assert abs(loss.item() - sum(rows) / len(rows)) < 1e-5
    # hand-worked: row 0 has one token with l = -1, row 1 two tokens with l = 0 and -2 -> (-1 + -1) / 2 = -1
    lp0 = torch.zeros(2, 2)
    loss, _ = token_policy_loss(lp0, lp0, torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0], [1, 1]]),
                                0.2, 0.2, seq_mean=True)
    assert abs(loss.item() + 1.0) < 1e-6  # token-mean would give (-1 + 0 - 2) / 3 = -1


def test_the_worked_example_in_docs_method():
    """docs/method.md, "A worked example": one 3-step episode through step GAE, whitening over steps and the step
    ratio at the authors' clip. The numbers printed there are these."""
    from credit import step_gae, whiten
    adv, ret = step_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.8]]), torch.ones(1, 3), 0.9, 0.8)
    assert torch.allclose(adv, torch.tensor([[0.23008, 0.264, 0.2]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.73008, 0.864, 1.0]]), atol=1e-6)
    a = whiten(adv, torch.ones(1, 3))[0]  # mean 0.23136, unbiased std 0.03202
    assert torch.allclose(a, torch.tensor([-0.0400, 1.0194, -0.9794]), atol=1e-4)
    log_ratio = torch.tensor([[0.0001, -0.0001, 0.0], [0.0004, 0.0006, 0.0008], [-0.001, 0.0, 0.0]])  # lp - pi_old
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0]])  # steps of 2, 3 and 1 action tokens
    lp = log_ratio.clone().requires_grad_(True)
    loss, stats = step_policy_loss(lp, torch.zeros(3, 3), a, mask, 3e-4, 4e-4)
    assert abs(loss.item() - (0.03998 - 1.01980 + 0.97912) / 3) < 1e-5 and abs(stats["clipfrac"] - 2 / 3) < 1e-6
    loss.backward()  # only step 0 (inside the clip range) gets a gradient: -A / (3 steps x 2 tokens) per token
    assert torch.allclose(lp.grad, torch.tensor([[0.00666, 0.00666, 0], [0, 0, 0], [0, 0, 0]]), atol=1e-4)
