"""End-to-end runs of train.py with tiny budgets (CleanRL style): every estimator, resume, DDP, plugins, bad flags."""
import copy
import dataclasses
import importlib.util
import json
import math
import os
import textwrap
import types

import pytest
import torch

import learner
import train
from conftest import TINY, assert_same_metrics, computed, metric_rows, one_iteration, run, torchrun_train

@pytest.mark.parametrize("env", ["multihop", "alfworld"])
@pytest.mark.parametrize("estimator,loss", [("step_gae", "step"), ("token_gae", "token"), ("grpo", "token"),
                                            ("rloo", "step"), ("gigpo", "step"), ("reinforce_pp", "token"),
                                            ("reinforce_pp_baseline", "step"), ("token_gae", "step")])
def test_two_iterations_every_estimator(tmp_path, env, estimator, loss):
    # an invalid-action penalty makes rewards non-zero even for an untrained model, so the critic has work to do
    out, rows = run(tmp_path, "--env", env, "--estimator", estimator, "--loss", loss,
                    "--env-kwargs", '{"invalid_penalty": 0.1}', *(["--max-new-tokens", "20"] if env == "alfworld" else []))
    assert [r["iter"] for r in rows] == [0, 1, 2]
    for key in ("success_rate", "mean_return", "mean_steps", "invalid_rate", "policy_loss", "value_loss",
                "clipfrac", "approx_kl", "entropy", "tokens_per_s", "wall_s", "eval_success_rate"):
        assert key in rows[0] and isinstance(rows[0][key], float), key
    assert all(0 <= r["eval_success_rate"] <= 1 for r in rows)
    assert 1 <= rows[0]["mean_steps"] <= 3 and rows[0]["entropy"] > 0
    assert rows[0]["engine_kl"] < 1e-5  # the HF engine on CPU in fp32 computes the trainer's own log-probs
    assert all(r["mixed_groups"] in (0.0, 0.5, 1.0) for r in rows if "mixed_groups" in r)  # a share of the 2 groups
    critic_rows = [r for r in rows if "explained_var" in r]  # absent where every return of the batch is equal
    has_critic = bool(train.ESTIMATORS[estimator].critic)
    # the penalty makes returns differ between steps, so a critic's explained variance is defined (and finite)
    assert (critic_rows and all(math.isfinite(r["explained_var"]) for r in critic_rows)) if has_critic else not critic_rows
    if not has_critic:
        assert rows[0]["value_loss"] == 0.0  # no critic for the critic-free estimators
    else:
        assert rows[0]["value_loss"] > 0.0
    assert os.path.exists(os.path.join(out, "final", "config.json"))
    assert os.path.exists(os.path.join(out, "ckpt-1", "meta.json"))  # the last iteration's checkpoint


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    _, full = run(tmp_path, "--iters", "3", name="full")
    out, _ = run(tmp_path, "--iters", "2", name="cut")  # "interrupted" after two iterations
    train.main(train.parse_config(TINY + ["--out", out, "--iters", "3", "--resume"]))
    resumed = metric_rows(out)
    assert [r["iter"] for r in resumed] == [r["iter"] for r in full] == [0, 1, 2, 3]
    assert_same_metrics(full, resumed)


def test_iters_zero_is_a_warm_start_other_runs_can_share(tmp_path):
    """Warm start (--iters 0), then RL from its saved policy = one run doing both: RL starts with a fresh optimiser
    either way, and the critic and the KL reference start from the warm-started policy (benches rely on this)."""
    warm, rows = run(tmp_path, "--iters", "0", "--eval-episodes", "4", name="warm")
    assert [{k for k in r if not k.startswith("eval_success_rate_")} for r in rows] == [{"iter", "eval_success_rate"}]  # no RL
    from model import load_policy
    base, saved = load_policy("tiny")[0], load_policy(os.path.join(warm, "final"))[0]
    assert not torch.equal(base.lm_head.weight, saved.lm_head.weight)  # the saved policy is the warm-started one
    _, rl = run(tmp_path, "--model", os.path.join(warm, "final"), "--sft-steps", "0", "--eval-episodes", "4", name="rl")
    assert rl[0]["eval_success_rate"] == rows[0]["eval_success_rate"]  # it starts where the warm start ended
    _, both = run(tmp_path, "--eval-episodes", "4", name="both")
    assert computed(rl) == computed(both)


def test_demonstrations_stop_at_max_steps(tmp_path, monkeypatch):
    """--max-steps limits every episode, the expert's demonstrations too (ALFWorld's own limit is 30 turns)."""
    seen, real = [], train.collect
    monkeypatch.setattr(train, "collect", lambda *a, **k: seen.append((a[4], k["expert"])) or real(*a, **k))
    run(tmp_path, "--env", "alfworld", "--iters", "0", "--max-steps", "2", "--max-new-tokens", "20")
    assert sorted(seen) == [(2, False), (2, True)]  # the demonstrations, then the evaluation


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(train.parse_config(TINY + ["--out", str(tmp_path / "none"), "--resume"]))
    (tmp_path / "unfinished" / "ckpt-3.tmp").mkdir(parents=True)  # a save that never finished is not a checkpoint
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(train.parse_config(TINY + ["--out", str(tmp_path / "unfinished"), "--resume"]))
    bad = tmp_path / "bad" / "ckpt-1"
    bad.mkdir(parents=True)
    (bad / "meta.pt").write_bytes(b"not a checkpoint")
    (bad / ".metadata").write_bytes(b"not a checkpoint either")
    with pytest.raises(SystemExit, match=r"no readable checkpoint in .*bad \(tried ckpt-1\)"):
        train.main(train.parse_config(TINY + ["--out", str(tmp_path / "bad"), "--resume"]))


@pytest.mark.parametrize("flags,message", [
    (["--estimator", "ppo"], "--estimator must be one of"),
    (["--loss", "cispo"], "--loss must be one of step, token, not 'cispo'"),
    (["--kl-coef", "-0.1"], "--kl-coef must be >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--env", "nowhere"], "unknown environment"),
    (["--env", "no_such_module:Env"], "cannot load environment"),
    (["--estimator", "grpo", "--group-size", "1", "--envs-per-iter", "4"], "group-size >= 2"),
    (["--envs-per-iter", "5", "--group-size", "2"], "multiple of --group-size"),
    (["--iters", "zero"], "invalid int value"),
    (["--vllm-memory", "1.5"], "--vllm-memory must be in (0, 1), not 1.5"),
    (["--env-kwargs", "[1]"], "must be a JSON object"),
    (["--estimator", "reinforce_pp_baseline", "--group-size", "1", "--envs-per-iter", "4"], "group-size >= 2"),
    (["--dual-clip", "0.5"], "--dual-clip must be > 1"),
    (["--step-clip-low", "-1"], "--step-clip-low must be in [0, 1), not -1.0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1], not 1.5"),
    (["--eval-split", "test"], "--eval-split must be one of eval, valid, train"),
    (["--env", "hotpotqa", "--eval-split", "valid"], "split must be"),
    (["--dtype", "fp16"], "--dtype must be one of fp32, bf16"),
    (["--vllm-sleep", "3"], "--vllm-sleep must be one of 0, 1, 2"),
    (["--micro-tokens", "-1"], "--micro-tokens must be >= 0, not -1"),
    (["--fsdp"], "--fsdp runs under torchrun"),
    (["--lr", "-1"], "--lr must be > 0, not -1.0"),
    (["--critic-lr", "0"], "--critic-lr must be > 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--vf-clip", "0"], "--vf-clip must be > 0"),
    (["--group-size", "0"], "--group-size must be >= 1"),
    (["--minibatch-size", "0"], "--minibatch-size must be >= 1"),
    (["--step-clip-low", "1"], "--step-clip-low must be in [0, 1), not 1.0"),
    (["--max-env-errors", "1.5"], "--max-env-errors must be in [0, 1], not 1.5"),
    (["--save-every", "-1"], "--save-every must be >= 0, not -1"),
    (["--env", "multihop", "--env-kwargs", '{"colour": 1}'], "--env 'multihop'"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0, not -1"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--compile", "--grad-ckpt"], "--compile runs in one process (not under torchrun), without --lora-rank and --grad-ckpt"),
    (["--report-to", "mlflow"], "--report-to takes a comma-separated list of none, tensorboard, wandb"),
    *([(["--report-to", "tensorboard,wandb"], "--report-to wandb needs the wandb package")]
      if importlib.util.find_spec("wandb") is None else []),
])
def test_bad_flags_fail_before_work(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err



def test_every_estimator_in_the_table_is_tested_and_a_new_one_is_one_entry(tmp_path, monkeypatch, capsys):
    """ESTIMATORS is the one place: --estimator's choices, --help, the group-size check, the critic rule and the
    dispatch all read it; a new entry trains without any other edit and nothing falls through to another estimator."""
    import credit
    tested = {e for e, _ in test_two_iterations_every_estimator.pytestmark[0].args[1]}
    assert tested == set(train.ESTIMATORS)  # every entry runs end to end above
    calls = []

    def step_rloo(x):  # a forked estimator: leave-one-out over each step's reward-to-go within the task group
        calls.append(x.rewards.shape)
        to_go = x.rewards.flip(1).cumsum(1).flip(1)  # (N, T), gamma 1
        return torch.stack([credit.rloo(to_go[:, t], x.groups) for t in range(to_go.shape[1])], 1) * x.step_mask, None

    monkeypatch.setitem(train.ESTIMATORS, "step_rloo", credit.Estimator(advantages=step_rloo, critic="", grouped=True, loss="step", whitening="none", about="fork"))
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    assert "step_rloo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # grouped: the table's flag drives the check
        train.parse_config(["--estimator", "step_rloo", "--group-size", "1", "--envs-per-iter", "4"])
    assert e.value.code == 2 and "group-size >= 2" in capsys.readouterr().err
    cfg = train.parse_config(TINY + ["--out", str(tmp_path / "fork"), "--estimator", "step_rloo"])
    assert cfg.loss == "step"  # the entry's loss, as --loss was not given
    train.main(cfg)
    rows = metric_rows(str(tmp_path / "fork"))
    assert len(calls) == 2 and rows[0]["value_loss"] == 0.0  # its function ran each iteration, no critic was built
    assert train.parse_config(["--estimator", "grpo"]).loss == "token"  # the authors' pairing for GRPO
    assert train.parse_config(["--estimator", "grpo", "--loss", "step"]).loss == "step"  # a given --loss wins


def test_compute_advantages_calls_exactly_the_table_entry():
    """Each entry's own function produces the advantages the update sees, and "--whiten" applies only where the
    table says so: no elif chain, no fallback."""
    import credit
    from conftest import CountEnv
    from model import load_policy
    from rollout import HFEngine, collect
    model, tok = load_policy("tiny")
    env_list = [CountEnv() for _ in range(4)]
    trajs = collect(HFEngine(model, tok), env_list, tok, [1, 1, 2, 2], 4, 6, 1.0, seed=0)
    for name, est in train.ESTIMATORS.items():
        mark = float(len(name))  # a value no real estimator gives every step

        def fake(x, est=est, mark=mark):
            return torch.full_like(x.rewards, mark) * x.step_mask, (torch.zeros_like(x.rewards) if est.critic else None)
        cfg = train.Config(estimator=name, whiten=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(train.ESTIMATORS, name, credit.Estimator(advantages=fake, critic="", grouped=est.grouped,
                                                                loss=est.loss, whitening=est.whitening, about=""))
            adv = one_iteration(cfg, model, None, None, trajs, tok.pad_token_id)[2]
        T = adv["adv_step"].shape[1]
        real = adv["adv_step"][torch.tensor([[t < len(tr.steps) for t in range(T)] for tr in trajs])]
        if est.whitening == "--whiten":  # a constant whitens to 0
            assert torch.all(real == 0), name
        else:
            assert torch.all(real == mark), name

def test_unknown_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        train.parse_config(TINY + ["--out", str(tmp_path / "m"), "--model", "no/such-model"])
    assert e.value.code == 2 and "--model 'no/such-model' is not in the local Hugging Face cache" in capsys.readouterr().err


def test_non_finite_update_is_skipped():
    import scale
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.ones(1, 3)).sum() * float("nan")).backward()
    norm = scale.optimizer_step(opt, model, 1.0)
    assert math.isnan(norm) and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # the bad gradient is not carried into the next step
    model(torch.ones(1, 3)).sum().backward()
    assert math.isfinite(scale.optimizer_step(opt, model, 1.0))
    assert not torch.equal(before[0], model.weight)



def test_optimizer_step_returns_the_norm_before_the_clip_and_clips_as_pytorch_does():
    """Hand-worked: gradients 3 and 4 have norm 5. Below max_norm the gradients are left as they are (no multiply by
    1), above it they are scaled by max_norm / (5 + 1e-6); either way the weights equal clip_grad_norm_ + the step's
    bit for bit, and the returned norm is the one before the clip."""
    import scale
    for max_norm in (10.0, 1.0):
        models = [torch.nn.Linear(1, 1) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in models]
        for m in models:
            (3 * m.weight.sum() + 4 * m.bias.sum()).backward()  # d/dw = 3, d/db = 4
        want_w = models[0].weight.item() - 3 * min(1.0, max_norm / (5 + 1e-6))
        assert scale.optimizer_step(opts[0], models[0], max_norm) == pytest.approx(5.0)
        torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm)
        opts[1].step()
        assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
        assert models[0].weight.item() == pytest.approx(want_w)

PLUGIN = '''
class Guess:
    """A plugin env: say the secret word. Follows the protocol of envs/__init__.py."""
    system_prompt = "Reply with <action>WORD</action>."
    max_steps = 2

    def __init__(self, split="train"):
        self.split = split

    def _info(self, won=False, invalid=False):
        return {"task_id": f"guess-{self.word}", "won": won, "invalid": invalid, "admissible": ["red", "blue"],
                "expert": f"<action>{self.word}</action>", "prompt": f"Say {self.word}."}

    def reset(self, seed):
        self.seed, self.word, self.done = seed, ("red", "blue")[seed % 2], False
        return f"Say {self.word}.", self._info()

    def step(self, response):
        if self.done:
            raise RuntimeError("episode is over")
        won = f"<action>{self.word}</action>" in response
        self.done = won
        return ("Right." if won else "Wrong."), float(won), won, self._info(won=won, invalid=not won)


class GuessNoDemosOnRank1(Guess):
    """No expert for seeds from 10_000_004: with --sft-episodes 4, process 1 gets no demonstration."""
    def _info(self, won=False, invalid=False):
        return {**super()._info(won, invalid), **({"expert": None} if self.seed >= 10_000_004 else {})}
'''


def test_plugin_env_trains(tmp_path, monkeypatch):
    (tmp_path / "guess_plugin_for_train.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    _, rows = run(tmp_path, "--env", "guess_plugin_for_train:Guess")
    assert [r["iter"] for r in rows] == [0, 1, 2] and rows[0]["mean_steps"] >= 1



def test_a_plugin_without_split_gets_a_one_line_error_naming_split(tmp_path, monkeypatch, capsys):
    (tmp_path / "guess_no_split.py").write_text(textwrap.dedent(PLUGIN).replace('def __init__(self, split="train"):',
                                                                              "def __init__(self):"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--env", "guess_no_split:Guess"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "`split`" in err and "usage" not in err, err

def test_two_process_gloo_run(tmp_path):
    out = str(tmp_path / "ddp")
    r = torchrun_train([*TINY, "--out", out], port=29517)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metric_rows(out)
    assert [r["iter"] for r in rows] == [0, 1, 2]
    assert rows[0]["mean_steps"] >= 1


def test_a_process_without_demonstrations_stops_every_process(tmp_path):
    (tmp_path / "guess_plugin_ddp.py").write_text(textwrap.dedent(PLUGIN))
    r = torchrun_train([*TINY, "--out", str(tmp_path / "ddp"), "--env", "guess_plugin_ddp:GuessNoDemosOnRank1"],
                       port=29518, env={"PYTHONPATH": str(tmp_path)}, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("a process got no expert demonstration") == 2, r.stderr[-3000:]  # both processes say it


def test_help_shows_the_step_and_token_clip_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--step-clip-low", "0.0003"), ("--step-clip-high", "0.0004"), ("--clip-low", "0.2"),
                          ("--clip-high", "0.28"), ("--dual-clip", "10.0"), ("--kl-coef", "0.001")):
        entry = out[out.index(f"{flag} {flag.upper()[2:].replace('-', '_')} "):][:220]  # the flag's own help text
        assert f"(default: {default})" in entry, entry
    cfg = train.parse_config([])
    assert (cfg.gamma, cfg.lam, cfg.epochs, cfg.kl_coef, cfg.bootstrap) == (1.0, 1.0, 1, 0.001, False)


def test_default_step_clip_clips_some_steps(tmp_path):
    """At the authors' step clip (1 -/+ 3e-4 / 4e-4) later minibatches of an iteration see clipped steps. The invalid-
    action penalty gives every step a non-zero advantage (the 3-step warm start leaves most actions invalid), so the
    policy moves by more than the clip after one minibatch on any CPU, not by rounding alone."""
    _, rows = run(tmp_path, "--iters", "3", "--envs-per-iter", "8", "--minibatch-size", "2",
                  "--env-kwargs", '{"invalid_penalty": 0.1}')
    clipfrac = [r["clipfrac"] for r in rows if "clipfrac" in r]
    assert len(clipfrac) == 3 and all(c > 0 for c in clipfrac), clipfrac


class FixedCritic(torch.nn.Module):
    """V(tokens <= j) = (sum of those token ids) / 1000: a critic whose values tell which context they read."""
    backbone = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=4096))

    def forward(self, input_ids, attention_mask=None):
        return (input_ids * attention_mask).cumsum(1).float() / 1000



def one_update(tiny, critic, flags=()):
    """One iteration's update on 4 CountEnv trajectories in ONE minibatch (so its stats are the first minibatch's)."""
    from conftest import CountEnv
    from rollout import HFEngine, collect
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    trajs = collect(HFEngine(model, tok), [CountEnv() for _ in range(4)], tok, [1, 1, 2, 2], max_steps=4,
                    max_new_tokens=4, temperature=1.0, seed=0)
    cfg = train.parse_config(["--envs-per-iter", "4", "--group-size", "2", "--minibatch-size", "4", *flags])
    dev = torch.device("cpu")
    batches = one_iteration(cfg, model, critic, None, trajs, tok.pad_token_id, dev, torch.Generator().manual_seed(0))[0]
    opt_p = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-3) if critic is not None else None
    return trajs, learner.update(cfg, model, critic, opt_p, opt_c, batches, dev)


@pytest.mark.parametrize("loss", ["step", "token"])
def test_the_ratio_is_exactly_one_on_the_first_minibatch(tiny, loss):
    """pi_old is the trainer's own forward before the update, so before any optimizer step every ratio is exactly 1:
    nothing clipped, approx_kl 0 (the 37-details check; docs/metrics.md)."""
    _, st = one_update(tiny, None, ["--estimator", "grpo", "--loss", loss])
    assert st["clipfrac"] == 0.0 and st["approx_kl"] == 0.0


def test_the_step_critic_is_trained_at_step_boundaries_only(tiny):
    """The value loss of step_gae reaches the critic's outputs only at each step's boundary (the last state token)."""
    class Recording(FixedCritic):
        def __init__(self):
            super().__init__()
            self.bias, self.seen = torch.nn.Parameter(torch.zeros(())), []

        def forward(self, input_ids, attention_mask=None):
            v = super().forward(input_ids, attention_mask) + self.bias
            if v.requires_grad:  # the update's forward, not no_grad_pass's
                v.register_hook(lambda grad: self.seen.append((input_ids, grad)))
            return v
    critic = Recording()
    trajs, _ = one_update(tiny, critic)
    boundaries = {tuple(s.prompt_ids) for tr in trajs for s in tr.steps}
    (ids, grad), = critic.seen
    hits = [(b, j) for b, j in (grad != 0).nonzero().tolist()]
    assert hits and all(tuple(ids[b, :j + 1].tolist()) in boundaries for b, j in hits)
    assert len(hits) == sum(len(tr.steps) for tr in trajs)  # one value-loss term per step

def test_bootstrap_reads_the_next_state_at_its_step_boundary(tiny):
    from conftest import CountEnv
    from rollout import HFEngine, collect
    model, tok = tiny
    trajs = collect(HFEngine(model, tok), [CountEnv(), CountEnv()], tok, [3, 0], max_steps=2, max_new_tokens=4,
                    temperature=1.0, seed=0)  # seed 3 is cut after 2 of its 4 turns, seed 0 ends after 1
    assert not trajs[0].terminated and trajs[1].terminated
    critic = FixedCritic()
    for bootstrap, gamma in ((False, 0.9), (True, 0.9), (True, 1.0)):
        cfg = train.parse_config(["--gamma", str(gamma), "--lam", "1", *(["--bootstrap"] if bootstrap else [])])
        out = one_iteration(cfg, model, critic, None, trajs, tok.pad_token_id)[2]
        nxt = sum(trajs[0].next_prompt_ids) / 1000  # V(s_2): the critic at the last token of the next prompt
        want = gamma * nxt if bootstrap else 0.0  # reward 0 on a cut CountEnv episode
        assert abs(out["ret_step"][0, 1].item() - want) < 1e-5
        assert abs(out["ret_step"][1, 0].item() - 1.0) < 1e-6  # terminal: reward 1, nothing to bootstrap
    last = trajs[0].steps[-1]
    assert abs(nxt - sum(last.prompt_ids + last.action_ids) / 1000) > 1e-3  # not the end of the last action


def test_old_logprobs_are_the_trainers_and_engine_kl_measures_the_gap(tiny):
    import copy
    from conftest import CountEnv, forward_logprobs
    from rollout import HFEngine, collect
    model, tok = tiny
    trajs = collect(HFEngine(model, tok), [CountEnv()], tok, [2], max_steps=3, max_new_tokens=5, temperature=1.0, seed=1)
    cfg = train.parse_config(["--minibatch-size", "1"])
    dev = torch.device("cpu")
    lps = one_iteration(cfg, model, None, None, trajs, tok.pad_token_id, dev)[1]
    assert lps["engine_kl"] < 1e-6 and "ref_lp" not in lps
    shifted = copy.deepcopy(trajs)
    for s in shifted[0].steps:
        s.engine_logprobs = [x + 0.1 for x in s.engine_logprobs]  # an engine 0.1 nats more confident on every sampled token
    lps2 = one_iteration(cfg, model, None, model, shifted, tok.pad_token_id, dev)[1]
    assert abs(lps2["engine_kl"] - (math.exp(-0.1) - 1 + 0.1)) < 1e-5  # k3 of d = trainer - engine = -0.1
    for t, s in enumerate(trajs[0].steps):
        want = forward_logprobs(model, s.prompt_ids, s.action_ids)
        n = len(s.action_ids)
        assert torch.allclose(lps2["old_lp"][0, t, :n], want, atol=1e-5)  # the trainer's, not the shifted engine's
        assert torch.equal(lps2["ref_lp"][0, t, :n], lps2["old_lp"][0, t, :n])


@pytest.mark.parametrize("flags", [[], ["--micro-tokens", "40", "--minibatch-size", "3"], ["--no-pack", "--context", "window"]])
def test_no_grad_pass_is_one_forward_per_model_and_equals_a_step_by_step_loop(tiny, flags):
    """no_grad_pass (item 3 of issue 28): per micro-batch exactly one forward of the policy, the reference and the
    critic over the same rows, and every number equal to the obviously-correct loop: each step's prompt + action
    forwarded alone (pi_old, reference), the critic read at the step's last prompt token (V(s_t)) and before each
    action token (token_gae), and at the end of a cut episode's next state (--bootstrap)."""
    import copy
    from conftest import CountEnv, forward_logprobs
    from model import load_critic
    from rollout import HFEngine, collect
    model, tok = tiny
    cfg = train.parse_config(["--bootstrap", "--minibatch-size", "2", *flags])
    trajs = collect(HFEngine(model, tok), [CountEnv(with_prompt=True) for _ in range(5)], tok, [3, 1, 2, 4, 0], max_steps=3,
                    max_new_tokens=5, temperature=1.0, context=cfg.context, seed=2)  # cut and terminated episodes
    assert {t.terminated for t in trajs} == {True, False}
    torch.manual_seed(0)
    critic, ref = load_critic("tiny"), copy.deepcopy(model)
    critic.head.weight.data.normal_(0, 0.5)  # not the zero head it starts with: values that differ per context
    for p in ref.parameters():
        p.data += 0.02 * torch.randn_like(p)
    calls = {"policy": 0, "ref": 0, "critic": 0}
    hooks = [m.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, m in (("policy", model), ("ref", ref), ("critic", critic))]
    try:
        batches, fwd, _ = one_iteration(cfg, model, critic, ref, trajs, tok.pad_token_id)
    finally:
        for h in hooks:
            h.remove()
    mb = cfg.minibatch_size
    n_micro = sum(map(len, batches))  # every step in exactly one micro-batch
    steps = sorted((g, s) for micro in batches for m in micro for g, s in zip(m.gi.tolist(), m.si.tolist()))
    assert steps == [(i, t) for i, tr in enumerate(trajs) for t in range(len(tr.steps))]
    n_boot = -(-sum(not t.terminated for t in trajs) // mb)  # the cut episodes' next states, a minibatch per forward
    assert calls == {"policy": n_micro, "ref": n_micro, "critic": n_micro + n_boot}

    def value(ids):  # V(tokens <= j) for every j of one context, alone in its batch
        with torch.no_grad():
            return critic(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    for i, tr in enumerate(trajs):
        for t, s in enumerate(tr.steps):
            n, v = len(s.action_ids), value(s.prompt_ids + s.action_ids)
            assert torch.allclose(fwd["old_lp"][i, t, :n], forward_logprobs(model, s.prompt_ids, s.action_ids), atol=1e-5)
            assert torch.allclose(fwd["ref_lp"][i, t, :n], forward_logprobs(ref, s.prompt_ids, s.action_ids), atol=1e-5)
            assert abs(fwd["v_step"][i, t] - v[len(s.prompt_ids) - 1]) < 1e-5
            assert torch.allclose(fwd["v_tok"][i, t, :n], v[len(s.prompt_ids) - 1: -1], atol=1e-5)
            assert torch.all(fwd["old_lp"][i, t, n:] == 0)
        want = 0.0 if tr.terminated else value(tr.next_prompt_ids)[-1].item()
        assert abs(fwd["boot"][i].item() - want) < 1e-5


@pytest.mark.parametrize("loss", ["step", "token"])
def test_tis_with_an_engine_that_matches_the_trainer_changes_nothing(tmp_path, loss):
    """--tis-cap weights each step (or token) by min(pi_trainer / pi_engine, cap): the HF engine in fp32 computes the
    trainer's own log-probs, so every weight is 1 to float noise and the run is the run without it."""
    _, plain = run(tmp_path, "--loss", loss, name="plain")
    _, tis = run(tmp_path, "--loss", loss, "--tis-cap", "2", name="tis")
    assert len(tis) == 3 and "policy_loss" in tis[1]
    assert_same_metrics(plain, tis)


def test_bootstrap_reads_the_critic_at_a_cut_episodes_next_state(tmp_path):
    """--bootstrap with every episode cut after one step: at iteration 0 the critic is zero (V(s_T) = 0, the same
    targets as without it); once it has learned, V(s_T) enters the returns and the critic's loss differs."""
    flags = ["--estimator", "token_gae", "--loss", "token", "--max-steps", "1", "--iters", "3",
             "--env-kwargs", '{"invalid_penalty": 0.1}']
    _, plain = run(tmp_path, *flags, name="plain")
    _, boot = run(tmp_path, *flags, "--bootstrap", name="boot")
    assert boot[0]["value_loss"] == plain[0]["value_loss"] and boot[2]["value_loss"] != plain[2]["value_loss"]


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_a_constant_one(tiny):
    from conftest import CountEnv
    from rollout import HFEngine, collect
    model, tok = tiny
    trajs = collect(HFEngine(model, tok), [CountEnv() for _ in range(4)], tok, [0, 1, 2, 3], max_steps=4,
                    max_new_tokens=3, temperature=1.0, seed=0)  # reward 1 at the end of each episode
    cfg = train.parse_config(["--gamma", "0.5", "--lam", "1"])

    class Constant(FixedCritic):
        def forward(self, input_ids, attention_mask=None):
            return torch.full(input_ids.shape, 0.3)
    cpu = torch.device("cpu")
    out = one_iteration(cfg, model, Constant(), None, trajs, tok.pad_token_id, cpu)[2]
    assert abs(out["explained_var"]) < 1e-5  # V = const explains none of the returns' variance

    class Perfect(FixedCritic):  # V(s_t) = 0.5^(steps left - 1): the true return of every state of CountEnv
        def forward(self, input_ids, attention_mask=None):
            v = torch.zeros(input_ids.shape)
            for b, row in enumerate(input_ids.tolist()):
                for tr in trajs:
                    for t, s in enumerate(tr.steps):
                        if row[:len(s.prompt_ids)] == s.prompt_ids:
                            v[b, len(s.prompt_ids) - 1] = 0.5 ** (len(tr.steps) - 1 - t)
            return v
    out = one_iteration(cfg, model, Perfect(), None, trajs, tok.pad_token_id, cpu)[2]
    assert out["explained_var"] > 1 - 1e-5


def test_the_critic_starts_from_the_warm_started_policy(tmp_path, monkeypatch):
    """As the authors start the critic from the actor's model, ours starts from the policy after its warm start
    (no update runs, so the checkpoint holds both as they were at the start of RL)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    keys = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "kl_ref")
    monkeypatch.setattr(train, "update", lambda *a, **k: {**dict.fromkeys(keys, 0.0), "skipped_updates": 0, "optimizer_steps": 1, "train_tokens": 1})
    out, _ = run(tmp_path, "--iters", "1")
    dcp_to_torch_save(os.path.join(out, "ckpt-0"), str(tmp_path / "ckpt.pt"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    backbone = {k[len("backbone."):]: v for k, v in ckpt["critic"]["model"].items() if k.startswith("backbone.")}
    policy = {k[len("model."):]: v for k, v in ckpt["policy"]["model"].items() if k.startswith("model.")}
    assert backbone.keys() == policy.keys() and all(torch.equal(backbone[k], policy[k]) for k in policy)
    from model import load_policy
    base = load_policy("tiny")[0].model.state_dict()
    assert not all(torch.equal(base[k], policy[k]) for k in policy)  # and that is the warm-started one, not the base


def test_benchmark_records_count_only_with_the_same_warm_start(tmp_path, monkeypatch):
    """bench_learning skips a run recorded on an earlier machine only if the command is the same and, where both
    are known, the warm start's weights hash the same: a rebuilt warm start reruns the runs instead of mixing."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(train.__file__)), "bench"))
    import bench_learning as bl
    monkeypatch.setattr(bl, "ROOT", str(tmp_path))
    monkeypatch.setattr(bl, "RESULTS", str(tmp_path / "learning.json"))
    monkeypatch.setattr(bl, "ARGS", types.SimpleNamespace(runs_dir="runs"), raising=False)
    kept = tmp_path / bl.warm_model("alfworld", 0)
    kept.mkdir(parents=True)
    (kept / "model.safetensors").write_bytes(b"weights v1")
    job = {"env": "alfworld", "method": "StepPO", "seed": 3, "lr": 1e-4, "out": "runs/alfworld/StepPO/seed3"}
    job["cmd"] = bl.command(job)
    entry = dict(job, cmd=bl.shown_cmd(job), final=0.1, model_sha256=bl.model_sha256(bl.model_of(job)))
    bl.save_results({"runs": [entry]})
    assert bl.recorded(job)["final"] == 0.1 and bl.finished(job)
    (kept / "model.safetensors").write_bytes(b"weights v2")  # rebuilt: same folder, other weights
    assert bl.recorded(job) is None and not bl.finished(job)
    bl.save_results({"runs": [{k: v for k, v in entry.items() if k != "model_sha256"}]})  # a record without a hash
    assert bl.recorded(job) is not None
    os.remove(kept / "model.safetensors")  # the model is not here: the command decides
    bl.save_results({"runs": [entry]})
    assert bl.recorded(job) is not None


def test_benchmark_run_folders_count_only_with_the_same_warm_start(tmp_path, monkeypatch):
    """A finished run folder counts (and an unfinished one resumes) only if it was made from the warm start that is
    here now: run_all writes the warm start's hash into the folder at launch and discards a folder that names
    another (the warm start was rebuilt under the same name), instead of resuming its old checkpoints."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(train.__file__)), "bench"))
    import bench_learning as bl
    monkeypatch.setattr(bl, "ROOT", str(tmp_path))
    monkeypatch.setattr(bl, "RESULTS", str(tmp_path / "learning.json"))
    monkeypatch.setattr(bl, "ARGS", types.SimpleNamespace(runs_dir="runs", jobs=1), raising=False)
    warm = tmp_path / bl.warm_model("multihop", 0)
    warm.mkdir(parents=True)
    (warm / "model.safetensors").write_bytes(b"weights v1")
    job = {"env": "multihop", "method": "StepPO", "seed": 0, "lr": 1e-4, "out": "runs/multihop/StepPO/seed0"}
    job["cmd"] = bl.command(job)
    out = tmp_path / job["out"]
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text(json.dumps({"iter": bl.ITERS, "eval_success_rate": 0.5}) + "\n")
    assert bl.finished_here(job)  # a folder from before the hash file: trusted, as before
    (out / "model_sha256").write_text(bl.model_sha256(bl.model_of(job)))
    assert bl.finished_here(job) and not bl.stale(job)
    (warm / "model.safetensors").write_bytes(b"weights v2")  # the warm start rebuilt under the same folder
    assert bl.stale(job) and not bl.finished_here(job) and not bl.finished(job)
    launched = []

    def fake_run(cmd, **kw):  # the run: the folder was emptied first, and it ends with its final evaluation
        launched.append((cmd, (out / "metrics.jsonl").exists()))
        (out / "metrics.jsonl").write_text(json.dumps({"iter": bl.ITERS, "eval_success_rate": 0.25}) + "\n")
        return types.SimpleNamespace(pid=1)
    monkeypatch.setattr(bl, "subprocess", types.SimpleNamespace(Popen=fake_run, STDOUT=None))  # bench_learning's only
    monkeypatch.setattr(bl.os, "wait4", lambda pid, opt: (1, 0, types.SimpleNamespace(ru_maxrss=1024)))
    bl.run_all([job])
    assert launched == [(job["cmd"] + ["--overwrite"], False)]  # started afresh (over the old folder's files), not --resume'd
    entry = bl.load_results()["runs"][0]
    assert entry["final"] == 0.25 and entry["model_sha256"] == bl.model_sha256(bl.model_of(job)) == (out / "model_sha256").read_text()
    assert f"torch {torch.__version__}" in entry["install"]  # the record names what it ran on


def test_defaults_are_the_documented_ones():
    """The algorithmic defaults docs/method.md attributes to the authors' scripts and verl (a change must change the
    docs too): one epoch, no entropy bonus, the step and token clips, KL, value clip, gradient clip, gamma, lambda."""
    cfg = train.Config()
    assert (cfg.estimator, cfg.loss, cfg.epochs, cfg.gamma, cfg.lam, cfg.kl_coef, cfg.vf_clip, cfg.max_grad_norm) == \
           ("step_gae", "step", 1, 1.0, 1.0, 0.001, 0.5, 1.0)
    assert (cfg.step_clip_low, cfg.step_clip_high, cfg.clip_low, cfg.clip_high, cfg.dual_clip) == (3e-4, 4e-4, 0.2, 0.28, 10.0)
    assert cfg.whiten and cfg.seq_mean and not cfg.bootstrap and cfg.tis_cap == 0.0
    assert not any("entropy" in f.name or "ent_coef" in f.name for f in dataclasses.fields(train.Config))


def test_credit_map_draws_what_credit_py_computes(tmp_path):
    """bench/credit_map.py on a small run writes its PNG, and every number it draws is credit.py's, recomputed here
    from the episodes it played (not through learner.compute_advantages): the figure cannot drift from the code."""
    import sys
    import credit
    out, _ = run(tmp_path, "--iters", "1", "--env-kwargs", '{"invalid_penalty": 0.1}')
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import credit_map
    png = credit_map.main([out, "--out", str(tmp_path / "cm" / "map.png"), "--group-size", "3"])
    assert os.path.getsize(png) > 10_000
    with open(str(tmp_path / "cm" / "map.json")) as f:
        rec = json.load(f)
    mat = {k: {kk: torch.tensor(vv) for kk, vv in v.items()} for k, v in rec["matrices"].items()}
    eps, cfg = rec["episodes"], rec["config"]
    N, T = mat["step_mask"]["mean"].shape
    M = mat["step_mask"]["mean"]
    R = torch.tensor([e["rewards"] + [0.0] * (T - len(e["rewards"])) for e in eps])
    g, lam, groups = cfg["gamma"], cfg["lam"], credit.group_index([e["task_id"] for e in eps])
    V, close = mat["V(s_t)"]["mean"], lambda a, b: torch.allclose(a, b, atol=1e-5)
    assert V.abs().sum() > 0  # the run's critic, read at step boundaries
    assert close(mat["step_gae"]["mean"], credit.whiten(credit.step_gae(R, V, M, g, lam)[0], M))
    tm = mat["inputs"]["token_mask"]
    assert tm.sum(2).tolist() == [e["action_tokens"] + [0] * (T - len(e["action_tokens"])) for e in eps]
    tok = credit.whiten(credit.token_gae_on_steps(R, mat["inputs"]["v_tok"], tm, g, lam)[0], tm)
    assert close(mat["token_gae"]["mean"], (tok * tm).sum(2) / tm.sum(2).clamp(min=1))
    assert close(mat["token_gae"]["min"], torch.where(tm > 0, tok, torch.tensor(9.0)).amin(2) * M)
    assert close(mat["token_gae"]["max"], torch.where(tm > 0, tok, torch.tensor(-9.0)).amax(2) * M)
    score = R.sum(1)
    assert close(mat["grpo"]["mean"], credit.grpo(score, groups)[:, None] * M)
    assert close(mat["rloo"]["mean"], credit.rloo(score, groups)[:, None] * M)
    states = torch.zeros(N, T, dtype=torch.long)
    keys = [(e["task_id"], e["observations"][t - 1] if t else "") for e in eps for t in range(len(e["rewards"]))]
    states[M > 0] = credit.group_index(keys)
    assert close(mat["gigpo"]["mean"], credit.gigpo(R, M, groups, states, g))
    assert close(mat["reinforce_pp_baseline"]["mean"], credit.reinforce_pp_baseline(R, M, groups))


# ------------------------------------------------------------------------------------------ faults a long run meets
FLAKY = '''
class Flaky:
    """A plugin env whose step raises on 1 task in 5 (seed % 5 == 0), as a flaky simulator or search service would."""
    system_prompt = "Reply with <action>WORD</action>."
    max_steps = 2

    def __init__(self, split="train", always=False):
        self.always = always

    def _info(self, won=False):
        return {"task_id": f"flaky-{self.seed}", "won": won, "invalid": not won, "admissible": None,
                "expert": "<action>red</action>", "prompt": "Say red."}

    def reset(self, seed):
        self.seed = seed
        return "Say red.", self._info()

    def step(self, response):
        if self.always or self.seed % 5 == 0:
            raise ConnectionError(f"simulator timed out on task {self.seed}")
        won = "<action>red</action>" in response
        return ("Right." if won else "Wrong."), float(won), won, self._info(won)
'''


def test_a_crashing_env_ends_its_episode_not_the_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "flaky_env.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    seen, real = [], learner.compute_advantages
    monkeypatch.setattr(train, "compute_advantages", lambda cfg, trajs, *a: seen.append(trajs) or real(cfg, trajs, *a))
    out, rows = run(tmp_path, "--env", "flaky_env:Flaky", "--iters", "3", "--envs-per-iter", "8", "--eval-episodes", "5",
                    "--sft-episodes", "10")
    err = capsys.readouterr()
    assert [r["iter"] for r in rows] == [0, 1, 2, 3] and sum(r["env_errors"] for r in rows if "env_errors" in r) > 0
    assert all(r["eval_env_errors"] == 1 for r in rows if "eval_success_rate" in r)  # eval seed 0 fails: a failure
    assert seen and all(t.error is None and int(t.task_id.split("-")[1]) % 5 for ts in seen for t in ts)  # none in the loss
    assert "ConnectionError: simulator timed out" in err.err and "Flaky.step raised on task seed" in err.err
    assert "warm start: 3 steps on 8 expert episodes" in err.out  # 2 of the 10 demonstrations errored, skipped
    with pytest.raises(SystemExit, match="episodes ended by an environment error"):  # errors as the rule: a clear stop
        run(tmp_path, "--env", "flaky_env:Flaky", "--env-kwargs", '{"always": true}', "--sft-steps", "0", name="broken")


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_resume_skips_an_unreadable_newest_checkpoint_and_never_unpickles_code(tmp_path, capsys):
    _, full = run(tmp_path, "--iters", "4", name="full")
    out, _ = run(tmp_path, "--iters", "3", name="cut")  # keeps ckpt-1 and ckpt-2
    shard = [f for f in os.listdir(os.path.join(out, "ckpt-2")) if f.endswith(".distcp")][0]
    truncate(os.path.join(out, "ckpt-2", shard))  # a partial copy, a full disk
    train.main(train.parse_config(TINY + ["--out", out, "--iters", "4", "--resume"]))
    err = capsys.readouterr()
    assert "ckpt-2 is unreadable or corrupt" in err.err and "resumed from" in err.out and "ckpt-1 at iteration 2" in err.out
    assert_same_metrics(full, metric_rows(out))  # continued from iteration 1's checkpoint
    import pickle
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    newest = os.path.join(out, "ckpt-3")
    os.remove(os.path.join(newest, "meta.json"))
    with open(os.path.join(newest, "meta.pt"), "wb") as f:
        pickle.dump(Payload(), f)  # a crafted meta file from a run folder "from elsewhere"
    train.main(train.parse_config(TINY + ["--out", out, "--iters", "4", "--resume"]))
    assert "ckpt-3 is unreadable or corrupt (UnpicklingError" in capsys.readouterr().err
    assert not marker.exists()  # weights_only: the payload never ran


def test_a_failed_checkpoint_write_is_reported_and_keeps_the_older_one(tmp_path, monkeypatch, capsys):
    import checkpoint
    real = checkpoint.dcp.save

    def full_disk(state, checkpoint_id):
        if checkpoint_id.endswith("ckpt-1.tmp"):
            raise OSError(28, "No space left on device")
        return real(state, checkpoint_id=checkpoint_id)
    monkeypatch.setattr(checkpoint.dcp, "save", full_disk)
    out, rows = run(tmp_path, "--iters", "3")
    assert [r["iter"] for r in rows] == [0, 1, 2, 3]  # the run went on
    assert "checkpoint of iteration 1 not written (OSError: [Errno 28] No space left on device)" in capsys.readouterr().err
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt")) == ["ckpt-0", "ckpt-2"]  # no ckpt-1.tmp left


def test_sigterm_writes_a_checkpoint_and_resume_continues_exactly(tmp_path):
    import signal
    import subprocess
    import sys
    from conftest import sigterm_after_two_rows
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "preempted")
    cmd = [sys.executable, os.path.join(root, "train.py"), *TINY, "--save-every", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    returncode, stderr = sigterm_after_two_rows([*cmd, "--iters", "50", "--out", out], out)
    assert returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    last = metric_rows(out)[-1]["iter"]
    assert f"stopped by SIGTERM after iteration {last}" in stderr and 1 <= last < 49
    assert os.path.exists(os.path.join(out, f"ckpt-{last}", "meta.json"))  # written although --save-every is 10
    n = last + 2
    r = subprocess.run([*cmd, "--iters", str(n), "--out", out, "--resume"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = str(tmp_path / "uninterrupted")  # the same process set-up (a subprocess, 1 thread): bit for bit
    r = subprocess.run([*cmd, "--iters", str(n), "--out", whole], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(metric_rows(whole)) == n + 1
    assert_same_metrics(metric_rows(whole), metric_rows(out), exact=True)


def test_a_bad_number_fails_in_seconds_with_one_line():
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = time.time()
    r = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--lr", "-1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["train.py: error: --lr must be > 0, not -1.0"]
    assert time.time() - start < 30  # before any model, env or data is built (mostly import time)


def test_report_to_tensorboard_holds_the_metrics_and_run_json_records_the_run(tmp_path):
    """--report-to tensorboard: the event file's scalars are metrics.jsonl's, read back with tensorboard's own reader;
    run.json holds the config, the versions, the machine and the commit, one record per start (--resume adds one)."""
    import importlib.metadata
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, rows = run(tmp_path, "--report-to", "tensorboard", "--iters", "1")
    _, rows = run(tmp_path, "--report-to", "tensorboard", "--iters", "2", "--resume")  # continues: new rows logged
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    want = {(k, r["iter"]): v for r in rows for k, v in r.items() if k != "iter"}
    got = {(k, e.step): e.value for k in acc.Tags()["scalars"] for e in acc.Scalars(k)}
    assert set(got) == set(want) and all(got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12) for key in want)
    assert "curve" in acc.Tags()["images"]
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()  # each evaluation's first episodes as text (--eval-episodes 2: both), the episode file's own
    evals = [e for e in (json.loads(line) for line in open(os.path.join(out, "episodes.jsonl"))) if e["split"] == "eval"]
    texts = {(tag, ev.step): ev.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]
             if tag.startswith("eval_episode_") for ev in acc.Tensors(tag)}
    assert len(texts) == len(evals) == 6 and all(f"task {e['task_id']}" in texts[(f"eval_episode_{e['seed']}/text_summary",
                                                                                  e["iter"])] for e in evals)
    record = json.load(open(os.path.join(out, "run.json")))["starts"]
    assert len(record) == 2 and record[1]["config"]["resume"] and not record[0]["config"]["resume"]
    assert record[0]["config"] == {**dataclasses.asdict(train.parse_config(TINY + ["--out", out, "--report-to",
                                                                                   "tensorboard", "--iters", "1"]))}
    assert record[0]["versions"]["torch"] == importlib.metadata.version("torch") and record[0]["python"]
    assert record[0]["cpu"] and record[0]["world_size"] == 1
    assert record[0]["git"] is None or len(record[0]["git"]["commit"]) == 40  # a checkout: its commit


@pytest.mark.parametrize("micro", ["0", "512"])
def test_with_a_learning_rate_that_moves_nothing_every_ratio_is_exactly_one(tmp_path, micro):
    """One batching per iteration: the no-grad pass and the update forward the same minibatches, rows, padding and
    micro-batches, so with weights that do not move (lr 1e-30) every step's ratio over 4 minibatches is exactly 1:
    nothing is clipped even at a step clip of 1e-12, and approx_kl is exactly 0."""
    _, rows = run(tmp_path, "--lr", "1e-30", "--step-clip-low", "1e-12", "--step-clip-high", "1e-12",
                  "--envs-per-iter", "8", "--minibatch-size", "2", "--micro-tokens", micro)
    trained = [r for r in rows if "clipfrac" in r]
    assert len(trained) == 2 and all(r["clipfrac"] == 0 and r["approx_kl"] == 0 and r["ratio_mean"] == 1
                                     for r in trained), trained


def test_collate_runs_once_per_minibatch_per_iteration(tmp_path, monkeypatch):
    calls = []
    real = learner.collate
    monkeypatch.setattr(learner, "collate", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    run(tmp_path, "--iters", "1", "--sft-steps", "0", "--envs-per-iter", "8", "--minibatch-size", "3")
    assert calls == [3, 3, 2]  # 8 trajectories in minibatches of 3: three collations, nothing else


def test_a_new_loss_is_one_table_entry(tmp_path, monkeypatch):
    """docs/extending.md's checklist: a loss registered in steppo_loss.LOSSES is accepted by --loss, runs, and every
    statistic it returns is logged; a name not in the table is a one-line error."""
    from steppo_loss import LOSSES, Loss, _masked_mean
    seen = []

    def reinforce(lp, old, adv, mask, w, cfg):  # plain policy gradient on the step's mean log-prob
        seen.append(lp.shape)
        per_step = (lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return _masked_mean(-adv * per_step, (mask.sum(-1) > 0).float()), {"my_stat": 0.5}
    monkeypatch.setitem(LOSSES, "pg", Loss(fn=reinforce, ratio="step", mean_over=lambda cfg: "steps", flags=(),
                                          about="REINFORCE on step log-probs"))
    _, rows = run(tmp_path, "--loss", "pg", "--env-kwargs", '{"invalid_penalty": 0.1}')
    assert seen and all(r["my_stat"] == 0.5 for r in rows if "policy_loss" in r)
    assert len([r for r in rows if "policy_loss" in r]) == 2
    with pytest.raises(SystemExit):
        train.parse_config(["--loss", "cispo"])
    with pytest.raises(ValueError, match="ratio"):
        Loss(fn=reinforce, ratio="steps", mean_over=lambda cfg: "steps", flags=(), about="")


def test_a_typo_in_a_table_entry_fails_when_it_is_built():
    import credit
    entry = dict(advantages=lambda x: x, critic="step", grouped=False, loss="step", whitening="--whiten", about="")
    credit.Estimator(**entry)
    for field, typo in (("critic", "steps"), ("whitening", "whiten"), ("loss", "cispo")):
        with pytest.raises(ValueError, match=field):
            credit.Estimator(**{**entry, field: typo})
    with pytest.raises(TypeError):  # keywords only: a positional entry cannot put a value in the wrong field
        credit.Estimator(entry["advantages"], "step", False, "step", "--whiten", "")


def test_the_lr_schedule_against_a_hand_computation():
    cfg = train.parse_config(["--iters", "10", "--lr-warmup", "3", "--lr-schedule", "linear", "--lr-floor", "0.1"])
    # warm-up (it + 1) / 4 for it 0-2; then from 1 at it 3 to 0.1 at it 9, linearly over 6 iterations
    want = [0.25, 0.5, 0.75, 1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1]
    assert [learner.lr_factor(cfg, it) for it in range(10)] == pytest.approx(want)
    cos = train.parse_config(["--iters", "5", "--lr-warmup", "0.2", "--lr-schedule", "cosine"])  # 0.2 x 5 = 1 iteration
    assert [learner.lr_factor(cos, it) for it in range(5)] == pytest.approx([0.5, 1.0, 0.75, 0.25, 0.0])
    assert all(learner.lr_factor(train.parse_config([]), it) == 1.0 for it in range(60))  # the default: constant
    with pytest.raises(SystemExit):
        train.parse_config(["--lr-warmup", "2.5"])


def test_a_warm_up_resumes_exactly_and_critic_warmup_leaves_the_policy_alone(tmp_path):
    from model import load_policy
    flags = ["--iters", "3", "--lr-warmup", "4", "--lr-schedule", "cosine", "--critic-warmup", "1",
             "--env-kwargs", '{"invalid_penalty": 0.1}']
    full, rows = run(tmp_path, *flags, name="full")
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([0.0, 1e-4 * 2 / 5, 1e-4 * 3 / 5])  # no policy step at 0
    assert [r["critic_lr"] for r in rows if "critic_lr" in r] == pytest.approx([1e-3 / 5, 1e-3 * 2 / 5, 1e-3 * 3 / 5])
    assert "policy_loss" not in rows[0] and "policy_loss" in rows[1] and rows[0]["value_loss"] > 0
    cut, _ = run(tmp_path, *flags, "--iters", "1", name="cut")  # stopped mid-warm-up ...
    warm, _ = run(tmp_path, *flags, "--iters", "0", name="warm")  # (the warm-started policy)
    one, start = load_policy(os.path.join(cut, "final"))[0], load_policy(os.path.join(warm, "final"))[0]
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), start.state_dict().values()))  # critic only
    train.main(train.parse_config(TINY + [*flags, "--out", cut, "--resume"]))  # ... and continued
    assert_same_metrics(rows, metric_rows(cut))


@pytest.mark.parametrize("env,flags", [("multihop", []), ("alfworld", ["--max-new-tokens", "20"])])
def test_per_type_evaluation_sums_to_the_overall_rate(tmp_path, env, flags):
    out, rows = run(tmp_path, "--env", env, "--iters", "1", "--eval-episodes", "12", *flags)
    evals = [e for e in (json.loads(line) for line in open(os.path.join(out, "episodes.jsonl"))) if e["split"] == "eval"]
    for row in (r for r in rows if "eval_success_rate" in r):
        mine = [e for e in evals if e["iter"] == row["iter"]]
        types = {e["task_type"] for e in mine}
        assert len(mine) == 12 and None not in types and len(types) >= 2
        assert {k for k in row if k.startswith("eval_success_rate_")} == {f"eval_success_rate_{t}" for t in types}
        counts = {t: sum(e["task_type"] == t for e in mine) for t in types}
        assert sum(row[f"eval_success_rate_{t}"] * n for t, n in counts.items()) / 12 == pytest.approx(row["eval_success_rate"])
        for t in types:  # each type's rate is its own episodes' share of wins
            assert row[f"eval_success_rate_{t}"] == pytest.approx(sum(e["success"] for e in mine if e["task_type"] == t) / counts[t])
    if env == "alfworld":
        assert types <= {"pick", "look", "clean", "heat", "cool", "pick_two"}


def test_per_type_rates_by_hand():
    from records import eval_stats
    from step_mdp import Step, Trajectory

    def ep(kind, won, score=None):
        info = {"task_type": kind, **({"score": score} if score is not None else {})}
        return Trajectory([Step([1], [2], [0.0], info=info)], "t", terminated=True, success=won)
    trajs = [ep("Heat", True, 100.0), ep("Heat", False, 40.0), ep("heat", True, 70.0), ep("look", False, 0.0),
             ep("pick two", True, 90.0)]
    got = eval_stats(trajs, torch.device("cpu"))
    assert got["eval_success_rate"] == pytest.approx(3 / 5)
    assert got["eval_success_rate_heat"] == pytest.approx(2 / 3)  # "Heat" and "heat": one key
    assert got["eval_score_heat"] == pytest.approx(70.0) and got["eval_score_pick_two"] == 90.0
    assert got["eval_success_rate_look"] == 0.0 and got["eval_success_rate_pick_two"] == 1.0
    assert sum(got[f"eval_success_rate_{k}"] * n for k, n in (("heat", 3), ("look", 1), ("pick_two", 1))) / 5 == \
        pytest.approx(got["eval_success_rate"])


def test_dynamic_sampling_keeps_informative_groups_and_fills_the_batch():
    """--filter-groups with groups known to be uniform (every member the same return) or mixed: uniform groups are
    dropped, new tasks are played until --envs-per-iter trajectories are kept or --filter-rounds is spent."""
    import random
    from step_mdp import Step, Trajectory

    def group(task, returns):
        return [Trajectory([Step([1], [2], [0.0], reward=r)], f"task-{task}", terminated=True) for r in returns]
    mixed, uniform = (1.0, 0.0, 0.0, 1.0), (1.0, 1.0, 1.0, 1.0)
    first = group(0, mixed) + group(1, uniform) + group(2, uniform) + group(3, (0.0,) * 4)  # 1 of 4 groups informative
    assert [t.task_id for t in train.informative(first)] == ["task-0"] * 4
    rounds = []

    def play(seeds, sample_seed):  # a new task is mixed when its seed is even, uniform when it is odd
        rounds.append(list(dict.fromkeys(seeds)))
        assert all(seeds.count(s) == 4 for s in rounds[-1])  # whole groups of --group-size
        return [t for s in rounds[-1] for t in group(s, mixed if s % 2 == 0 else uniform)]
    cfg = train.parse_config(["--envs-per-iter", "16", "--group-size", "4", "--filter-groups", "--filter-rounds", "5"])
    kept, stats = train.dynamic_sampling(cfg, first, random.Random(0), torch.device("cpu"), play)
    new = [s for r in rounds for s in r]
    assert len(rounds[0]) == 3 and stats["sampling_rounds"] == len(rounds) <= 5  # 12 trajectories were missing
    assert len(kept) == 16 and all(len({t.total_reward for t in kept if t.task_id == k}) == 2
                                   for k in {t.task_id for t in kept})  # 4 mixed groups, whole
    assert stats["filtered_groups"] == pytest.approx((3 + sum(s % 2 for s in new)) / (4 + len(new)))
    assert stats["played_episodes"] == 16 + 4 * len(new)  # the first round and every extra group: the episode budget
    never = train.parse_config(["--envs-per-iter", "16", "--group-size", "4", "--filter-groups", "--filter-rounds", "2"])
    kept, stats = train.dynamic_sampling(never, first, random.Random(0), torch.device("cpu"),
                                         lambda s, k: [t for g in range(len(s) // 4) for t in group(100 + g, uniform)])
    assert len(kept) == 4 and stats["sampling_rounds"] == 2  # the bound: what is informative after 2 rounds trains
    assert stats["played_episodes"] == 16 + 12 + 12  # each extra round plays the missing 12 trajectories, whole groups
    none, _ = train.dynamic_sampling(never, group(1, uniform), random.Random(0), torch.device("cpu"), lambda s, k: [])
    assert len(none) == 4  # nothing informative at all: the first round's batch, unfiltered


def test_filter_groups_runs_end_to_end(tmp_path):
    _, rows = run(tmp_path, "--filter-groups", "--filter-rounds", "1", "--env-kwargs", '{"invalid_penalty": 0.1}')
    trained = [r for r in rows if "policy_loss" in r]
    assert len(trained) == 2 and all(0 <= r["filtered_groups"] <= 1 and r["sampling_rounds"] in (0, 1) for r in trained)


def test_bench_timing_takes_the_fastest_call_and_stops_at_its_budget():
    """bench/timing.py's best_of: the fastest of the timed calls after the untimed ones; past budget_s it stops
    early, after one untimed and one timed call (a bf16 product emulated on a CPU without bf16 instructions can take
    minutes), and without a budget every call runs."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import time
    from timing import best_of
    calls, sleeps = [], iter([0.0, 0.0, 0.0, 0.03, 0.01, 0.02])

    def fn():
        calls.append(1)
        time.sleep(next(sleeps))
        return len(calls)
    best, out = best_of(fn, reps=3, warmup=3)
    assert len(calls) == 6 and out == 6 and 0.01 <= best < 0.02
    calls.clear()
    assert best_of(lambda: calls.append(1), reps=10, warmup=3, budget_s=0.0)[0] < 1 and len(calls) == 2
