"""collate round trips, and packed rows give the same log-probs and values as one row per step."""
import random

import pytest
import torch

from step_mdp import Step, Trajectory, collate, packable
from steppo_loss import token_logprobs


def random_traj(rnd, n_steps, prefix=True, vocab=50, task="t"):
    steps, context = [], [rnd.randrange(1, vocab) for _ in range(rnd.randint(2, 6))]
    for t in range(n_steps):
        action = [rnd.randrange(1, vocab) for _ in range(rnd.randint(1, 5))]
        steps.append(Step(list(context), action, [-rnd.random() for _ in action], reward=float(rnd.random() < 0.3)))
        env_msg = [rnd.randrange(1, vocab) for _ in range(rnd.randint(1, 4))]
        context = (context + action + env_msg) if prefix else [rnd.randrange(1, vocab) for _ in range(rnd.randint(2, 8))]
    return Trajectory(steps, task, terminated=rnd.random() < 0.5)


@pytest.mark.parametrize("pack", [False, True])
def test_collate_round_trip(pack):
    rnd = random.Random(0)
    trajs = [random_traj(rnd, rnd.randint(1, 5), prefix=rnd.random() < 0.7) for _ in range(8)]
    b = collate(trajs, pad_id=0, pack=pack)
    k = 0
    for i, tr in enumerate(trajs):
        for t, s in enumerate(tr.steps):
            assert (b.traj_index[k].item(), b.step_index[k].item()) == (i, t)
            row = b.step_row[k].item()
            assert b.input_ids[row, : len(s.prompt_ids)].tolist() == s.prompt_ids
            assert b.value_positions[k].item() == len(s.prompt_ids) - 1
            n = len(s.action_ids)
            pos = torch.arange(len(s.prompt_ids), len(s.prompt_ids) + n)
            assert b.input_ids[row, pos].tolist() == s.action_ids  # decoding the action positions
            assert (b.action_mask[row, pos] == 1).all()
            assert torch.allclose(b.engine_logprobs[row, pos], torch.tensor(s.engine_logprobs))
            assert b.gather_steps(b.input_ids.float())[k, :n].long().tolist() == s.action_ids
            k += 1
        assert torch.allclose(b.rewards[i, : len(tr.steps)], torch.tensor([s.reward for s in tr.steps]))
        assert b.step_mask[i].sum().item() == len(tr.steps) and b.terminated[i].item() == tr.terminated
    assert k == b.step_row.shape[0]
    n_action_tokens = sum(len(s.action_ids) for tr in trajs for s in tr.steps)
    assert b.action_mask.sum().item() == n_action_tokens == b.action_step_mask.sum().item()
    if not pack:  # the contract: one row per step
        assert b.input_ids.shape[0] == k and torch.equal(b.step_row, torch.arange(k))
    else:
        assert b.input_ids.shape[0] == sum(1 if packable(tr) else len(tr.steps) for tr in trajs)


def test_packing_falls_back_when_prefix_breaks():
    rnd = random.Random(1)
    good, bad = random_traj(rnd, 4, prefix=True), random_traj(rnd, 4, prefix=False)
    assert packable(good) and not packable(bad)
    b = collate([good, bad], pad_id=0, pack=True)
    assert b.input_ids.shape[0] == 1 + 4 and b.packed
    assert b.step_row.tolist() == [0, 0, 0, 0, 1, 2, 3, 4]


def test_collate_rejects_bad_records():
    with pytest.raises(ValueError, match="no steps"):
        collate([Trajectory([], "x", True)], 0)
    with pytest.raises(ValueError, match="logprobs"):
        collate([Trajectory([Step([1], [2, 3], [-0.1])], "x", True)], 0)
    with pytest.raises(ValueError, match="empty prompt"):
        collate([Trajectory([Step([], [2], [-0.1])], "x", True)], 0)


def test_packed_and_per_step_rows_agree_on_a_causal_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lm = transformers.Qwen2ForCausalLM(cfg).eval()
    head = torch.nn.Linear(32, 1)  # a value head on the last hidden state: V(s_t) read at value_positions
    rnd = random.Random(2)
    trajs = [random_traj(rnd, rnd.randint(2, 5), vocab=64) for _ in range(4)]

    def forward(b):
        with torch.no_grad():
            out = lm(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
            values = head(out.hidden_states[-1]).squeeze(-1)  # (B, L)
        return b.gather_steps(token_logprobs(out.logits, b.input_ids)), b.step_values(values)

    per_step, packed = collate(trajs, 0, pack=False), collate(trajs, 0, pack=True)
    assert packed.input_ids.shape[0] == 4 < per_step.input_ids.shape[0]
    lp1, v1 = forward(per_step)
    lp2, v2 = forward(packed)
    assert torch.allclose(lp1, lp2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)
    assert packed.attention_mask.sum() < per_step.attention_mask.sum()  # fewer tokens forwarded
