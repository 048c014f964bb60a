"""Running at scale (scale.py, --fsdp / --dtype / --grad-ckpt / --micro-tokens / --vllm-sleep / sharded checkpoints):
what is computed must not change, only where and in how many pieces."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import scale
import learner
import train
from conftest import ROOT, assert_same_metrics, computed, forward_logprobs, one_iteration, metric_rows, sigterm_after_two_rows, torchrun_train
from dist_worker import ARGS, MODES, models, synthetic
from step_mdp import collate, split_rows
from model import step_logprobs

TINY = ["--iters", "2", "--envs-per-iter", "4", "--group-size", "2", "--max-steps", "3", "--max-new-tokens", "10",
        "--sft-steps", "3", "--sft-episodes", "4", "--eval-episodes", "2", "--eval-every", "1", "--minibatch-size", "2"]
CPU = torch.device("cpu")


@pytest.mark.parametrize("pack", [True, False])
def test_split_rows_puts_every_step_in_one_micro_batch_within_the_budget(pack):
    full = collate(synthetic(0) + synthetic(1), 0, pack=pack)
    lengths = full.attention_mask.sum(1)
    for budget in (1, 30, 60, 10_000):
        parts = split_rows(full, budget)
        assert sum(p.input_ids.shape[0] for p in parts) == full.input_ids.shape[0]
        for p in parts:  # within the budget, or a single longer row
            assert p.input_ids.numel() <= budget or p.input_ids.shape[0] == 1
        assert sorted((t, s) for p in parts for t, s in zip(p.traj_index.tolist(), p.step_index.tolist())) == \
            sorted(zip(full.traj_index.tolist(), full.step_index.tolist()))
        for p in parts:  # a micro-batch's steps read the same tokens as in the full batch
            for k in range(len(p.step_row)):
                j = ((full.traj_index == p.traj_index[k]) & (full.step_index == p.step_index[k])).nonzero().item()
                assert torch.equal(p.gather_steps(p.input_ids)[k], full.gather_steps(full.input_ids)[j])
                assert p.value_positions[k] == full.value_positions[j]
                assert p.input_ids[p.step_row[k], p.value_positions[k]] == full.input_ids[full.step_row[j], full.value_positions[j]]
    assert len(split_rows(full, 10_000)) == 1 and split_rows(full, 0) == [full]
    assert len(split_rows(full, 1)) == len(lengths)


def test_lm_head_at_action_positions_equals_the_full_logits(tiny, one_thread):
    model, _ = tiny
    b = collate(synthetic(0) + synthetic(1), 0, pack=True)
    (lp_a, ent_a), (lp_f, ent_f) = step_logprobs(model, b, True, True), step_logprobs(model, b, True, False)
    assert torch.allclose(lp_a, lp_f, atol=1e-6) and abs(ent_a - ent_f) < 1e-6
    for k, (t, s) in enumerate(zip(b.traj_index.tolist(), b.step_index.tolist())):  # token in, token out
        step = (synthetic(0) + synthetic(1))[t].steps[s]
        assert torch.allclose(lp_a[k, :len(step.action_ids)], forward_logprobs(model, step.prompt_ids, step.action_ids),
                              atol=1e-5)
    grads = []
    for at_actions in (True, False):
        model.zero_grad()
        (step_logprobs(model, b, False, at_actions)[0] * b.action_step_mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    assert all(torch.allclose(a, f, atol=1e-5, rtol=1e-5) for a, f in zip(*grads))


def _update(flags, trajs, micro_tokens):
    """One update of fresh tiny models with SGD; returns (stats, policy weights, critic weights, adv, lps)."""
    cfg = train.parse_config(ARGS + flags + ["--micro-tokens", str(micro_tokens)])
    policy, critic, ref, tok = models()
    batches, lps, adv = one_iteration(cfg, policy, critic, ref, trajs, tok.pad_token_id, CPU)
    opt_p, opt_c = torch.optim.SGD(policy.parameters(), lr=0.5), torch.optim.SGD(critic.parameters(), lr=0.5)
    st = learner.update(cfg, policy, critic, opt_p, opt_c, batches, CPU)
    return st, policy.state_dict(), critic.state_dict(), adv, lps


@pytest.mark.parametrize("flags", [
    ["--estimator", "step_gae", "--loss", "step", "--tis-cap", "2", "--minibatch-size", "2"],
    ["--estimator", "token_gae", "--loss", "token", "--no-seq-mean", "--no-pack", "--minibatch-size", "3"],
    ["--estimator", "step_gae", "--loss", "token", "--minibatch-size", "3"],
])
def test_micro_batched_gradients_equal_the_full_minibatch(flags, one_thread):
    """SGD: equal weights after the update mean equal (clipped) gradients; the diagnostics are the minibatch's too.
    Several minibatches, so the KL term (0 gradient while the policy is the reference) counts as well."""
    trajs, init = synthetic(0) + synthetic(1), models()
    full, micro = _update(flags, trajs, 0), _update(flags, trajs, 25)
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "kl_ref"):
        assert full[0][key] == pytest.approx(micro[0][key], rel=1e-4, abs=1e-6), key
    for a, b, start in ((full[1], micro[1], init[0]), (full[2], micro[2], init[1])):
        assert not torch.equal(a["lm_head.weight" if "lm_head.weight" in a else "head.weight"],
                               start.state_dict()["lm_head.weight" if "lm_head.weight" in a else "head.weight"])
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    for k in ("v_step", "v_tok", "adv_step"):  # the no-grad passes split the same way
        assert torch.allclose(full[3][k], micro[3][k], atol=1e-6)
    assert torch.allclose(full[4]["old_lp"], micro[4]["old_lp"], atol=1e-6)


def test_micro_batched_warm_start_equals_the_full_minibatch(one_thread):
    demos = synthetic(0) + synthetic(1)
    out = []
    for micro in (0, 20):
        cfg = train.parse_config(["--sft-steps", "2", "--minibatch-size", "4", "--micro-tokens", str(micro)])
        policy, _, _, tok = models()
        opt = torch.optim.SGD(policy.parameters(), lr=0.5)
        nll = learner.warm_start(cfg, policy, opt, demos, tok.pad_token_id, CPU, torch.Generator().manual_seed(3))
        out.append((nll, policy.state_dict()))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    assert all(torch.allclose(out[0][1][k], out[1][1][k], atol=1e-6) for k in out[0][1])


def test_fsdp_and_ddp_updates_equal_the_single_process_update(tmp_path):
    """2 processes (gloo) with different data, micro-batch counts and lengths, gradients clipped: FSDP2, DDP and each
    with --remove-padding give the weights of SGD on the average of the two processes' gradients (each computed here
    in one process)."""
    max_norm = 0.05
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                        os.path.join(ROOT, "tests", "dist_worker.py"), str(tmp_path), "--max-grad-norm", str(max_norm)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    trajs = {r: synthetic(r) for r in (0, 1)}
    init = models()
    for mode, flags in MODES.items():
        got = {r: torch.load(tmp_path / f"{mode}-rank{r}.pt", weights_only=False) for r in (0, 1)}
        assert got[0]["n_micro"] != got[1]["n_micro"]  # one process ran zero-weight micro-batches
        cfg = train.parse_config(ARGS + [f for f in flags if f != "--fsdp"] + ["--micro-tokens", "0", "--max-grad-norm", "1e9"])
        policy, critic, ref, tok = models(cfg.remove_padding)  # whitening over both processes' steps = over all of them in one place
        both = trajs[0] + trajs[1]
        adv = one_iteration(cfg, policy, critic, ref, both, tok.pad_token_id, CPU)[2]["adv_step"]
        for r, rows in ((0, slice(0, len(trajs[0]))), (1, slice(len(trajs[0]), None))):
            mine = got[r]["adv"]["adv_step"]
            assert torch.allclose(mine, adv[rows, :mine.shape[1]], atol=1e-5)
        step = {}  # each process's unclipped SGD step, in one process, from the same advantages
        for r in (0, 1):
            policy, critic, ref, tok = models(cfg.remove_padding)
            batches, lps, _ = one_iteration(cfg, policy, critic, ref, trajs[r], tok.pad_token_id, CPU)
            assert torch.allclose(lps["old_lp"], got[r]["lps"]["old_lp"], atol=1e-5)
            learner.attach(batches, got[r]["adv"], ("adv_step", "adv_tok", "ret_step", "ret_tok"), CPU)  # whitened over both
            opt_p, opt_c = torch.optim.SGD(policy.parameters(), lr=0.5), torch.optim.SGD(critic.parameters(), lr=0.5)
            learner.update(cfg, policy, critic, opt_p, opt_c, batches, CPU)
            step[r] = {"policy": dict(policy.named_parameters()), "critic": dict(critic.named_parameters())}
        weights = torch.load(tmp_path / f"{mode}-weights.pt", weights_only=False)
        for part, start in (("policy", init[0]), ("critic", init[1])):
            w0 = dict(start.named_parameters())
            g = {k: (w0[k] - (step[0][part][k] + step[1][part][k]) / 2).detach() / 0.5 for k in w0}  # averaged gradient
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g.values()]))
            coef = min(1.0, max_norm / (norm.item() + 1e-6))
            assert coef < 1  # the clip is active: it must use the global norm of the averaged gradient
            for k in w0:
                want = w0[k].detach() - 0.5 * coef * g[k]
                assert torch.allclose(weights[part][k], want, atol=2e-6, rtol=1e-5), (mode, part, k)


@pytest.mark.slow  # ~45-65 s on 2 cores (torchrun or a whole run): in CI's slow tier
def test_sharded_resume_reproduces_the_uninterrupted_run(tmp_path):
    """FSDP2 + bf16 + gradient checkpointing + micro-batches, 2 processes doing uneven work (HF generate on the
    gathered weights): trains, and resuming from the sharded checkpoint of iteration 0 gives the uninterrupted run's
    metrics exactly."""
    flags = [*TINY, "--fsdp", "--dtype", "bf16", "--grad-ckpt", "--micro-tokens", "64", "--kl-coef", "0.01",
             "--bootstrap", "--eval-episodes", "1",  # process 1 evaluates nothing: uneven generate calls
             "--env-kwargs", '{"invalid_penalty": 0.1}']  # non-zero rewards: the critic learns something
    full = str(tmp_path / "full")
    r = torchrun_train([*flags, "--out", full], port=29532)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(d for d in os.listdir(full) if d.startswith("ckpt")) == ["ckpt-0", "ckpt-1"]
    rows = metric_rows(full)
    assert [row["iter"] for row in rows] == [0, 1, 2] and all(row["skipped_updates"] == 0 for row in rows[:2])
    assert abs(rows[0]["engine_kl"]) < 1e-3 and rows[0]["value_loss"] > 0  # HF engine and trainer both compute in bf16
    cut = str(tmp_path / "cut")  # what a run interrupted after iteration 0 leaves behind
    os.makedirs(cut)
    shutil.copytree(os.path.join(full, "ckpt-0"), os.path.join(cut, "ckpt-0"))
    os.makedirs(os.path.join(cut, "ckpt-2.tmp"))  # a save that never finished: ignored
    shutil.copytree(os.path.join(full, "ckpt-1"), os.path.join(cut, "ckpt-1"))  # newest, with process 1's shard cut
    with open(os.path.join(cut, "ckpt-1", "__1_0.distcp"), "r+b") as f:
        f.truncate(100)
    r = torchrun_train([*flags, "--out", cut, "--resume"], port=29533)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("ckpt-1 is unreadable or corrupt") == 1 and "resumed from" in r.stdout  # rank 0 says it
    assert f"{os.path.join(cut, 'ckpt-0')} at iteration 1" in r.stdout  # every process fell back to ckpt-0 together
    resumed = metric_rows(cut)
    assert [row["iter"] for row in resumed] == [0, 1, 2]
    assert_same_metrics(rows, resumed)
    from model import load_policy  # final/ is a whole model gathered from the shards
    a, b = load_policy(os.path.join(full, "final"))[0], load_policy(os.path.join(cut, "final"))[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, load_policy("tiny")[0].lm_head.weight)



def _sharded_worker(mode, out, flags, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "tests", "sharded_load_worker.py"), mode, str(out), *flags]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # ~45-65 s on 2 cores (torchrun or a whole run): in CI's slow tier
def test_sharded_load_fills_every_shard_from_one_reader(tmp_path):
    """--fsdp (issue 31): models built on the meta device, sharded, filled from rank 0's read. Gathered, every
    parameter and buffer equals the checkpoint's (rotary inv_freq, which no checkpoint holds, too), the tied
    lm_head stays one parameter with the embedding, the critic is the checkpoint's backbone with a zero head, the
    reference the policy in bf16; and train.py's iterations give the metrics of the path that reads everything on
    every process (scale.load_full), without a reference (which is bf16 now, --dtype before: its KL moves at bf16
    noise, so it is checked by its weights above)."""
    from model import load_policy
    other, tok = load_policy("tiny")  # a --critic-model of its own (same tokenizer, other weights): read by rank 0
    torch.manual_seed(0)
    for p in other.parameters():
        p.data += 0.01 * torch.randn_like(p)
    other.save_pretrained(tmp_path / "critic")
    tok.save_pretrained(tmp_path / "critic")
    for flags, port in (([], 29541), (["--critic-model", str(tmp_path / "critic")], 29544)):
        _sharded_worker("check", tmp_path, flags, port)
        result = json.load(open(tmp_path / "check.json"))
        assert {k: v for k, v in result.items() if k != "buffers"} == {
            "tied": True, "policy_equal": True, "critic_equal": True, "ref_bf16_of_policy": True, "buffers_equal": True,
            "lm_head_is_embedding": True}, flags
    flags = [*TINY, "--kl-coef", "0", "--eval-episodes", "2", "--env-kwargs", '{"invalid_penalty": 0.1}']
    rows = {}
    for mode, port in (("train-sharded", 29542), ("train-full", 29543)):
        _sharded_worker(mode, tmp_path, flags, port)
        rows[mode] = computed(metric_rows(str(tmp_path / mode)))
    assert len(rows["train-sharded"]) == 3 and rows["train-sharded"][0]["value_loss"] > 0
    assert len(rows["train-full"]) == 3
    for a, b in zip(rows["train-sharded"], rows["train-full"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


@pytest.mark.slow  # ~45-65 s on 2 cores (torchrun or a whole run): in CI's slow tier
def test_sigterm_under_torchrun_every_process_checkpoints_and_stops(tmp_path):
    """torchrun forwards SIGTERM to both processes; they agree after the iteration in progress, write one sharded
    checkpoint together and stop; --resume under torchrun continues exactly."""
    out, flags = str(tmp_path / "preempted"), [*TINY, "--save-every", "10"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           os.path.join(ROOT, "train.py"), *flags, "--iters", "40", "--out", out]
    _, stderr = sigterm_after_two_rows(cmd, out)
    last = metric_rows(out)[-1]["iter"]
    assert f"stopped by SIGTERM after iteration {last}" in stderr, stderr[-3000:]
    assert sorted(f for f in os.listdir(os.path.join(out, f"ckpt-{last}")) if f.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # both processes wrote their shards
    n = last + 2
    r = torchrun_train([*flags, "--iters", str(n), "--out", out, "--resume"], port=29542)
    assert r.returncode == 0, r.stderr[-3000:]
    full = str(tmp_path / "full")
    r = torchrun_train([*flags, "--iters", str(n), "--out", full], port=29543)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_metrics(metric_rows(full), metric_rows(out))

def test_checkpoints_keep_the_newest_two_and_save_every(tmp_path):
    out = str(tmp_path / "run")
    train.main(train.parse_config(TINY + ["--iters", "4", "--save-every", "3", "--out", out]))
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt")) == ["ckpt-2", "ckpt-3"]  # every 3rd and the last
    meta = checkpoint.read_meta(os.path.join(out, "ckpt-3"))
    assert meta["iter"] == 3 and [r["iter"] for r in meta["history"]] == [0, 1, 2, 3]
    assert checkpoint.checkpoints(out) == [os.path.join(out, "ckpt-2"), os.path.join(out, "ckpt-3")]


def test_critic_can_be_another_model(tmp_path, tiny):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model, tok = tiny
    small = tmp_path / "small-critic"
    config = Qwen2Config(**{**model.config.to_dict(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "layer_types": None})
    Qwen2ForCausalLM(config).save_pretrained(small)
    tok.save_pretrained(small)
    out = str(tmp_path / "run")
    train.main(train.parse_config(TINY + ["--critic-model", str(small), "--out", out,
                                          "--env-kwargs", '{"invalid_penalty": 0.1}']))
    assert [r["iter"] for r in metric_rows(out)] == [0, 1, 2] and metric_rows(out)[0]["value_loss"] > 0
    with open(os.path.join(small, "config.json")) as f:
        assert json.load(f)["hidden_size"] == 64 != model.config.hidden_size
    Qwen2ForCausalLM(Qwen2Config(**{**config.to_dict(), "vocab_size": 64})).save_pretrained(tmp_path / "few-ids")
    with pytest.raises(SystemExit, match="--critic-model .* embeds 64 ids"):  # it could not read the policy's tokens
        train.main(train.parse_config(TINY + ["--critic-model", str(tmp_path / "few-ids"), "--out", out + "-few-ids"]))


class FakeLLM:
    """Records what VLLMEngine asks of vllm.LLM."""
    def __init__(self):
        self.calls = []
        self.llm_engine = type("E", (), {"model_config": type("C", (), {"dtype": torch.bfloat16})()})()

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs=None):
        weights = list(kwargs["weights_iterator"]) if kwargs and "weights_iterator" in kwargs else None
        self.calls.append((method, weights))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", None))


def test_vllm_engine_sleeps_then_wakes_weights_loads_them_then_wakes_the_kv_cache(tiny):
    from rollout import VLLMEngine
    model, _ = tiny
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM needed: the order of the calls is what is checked
    engine.llm, engine.sleep_level, engine.asleep = FakeLLM(), 2, False
    engine.sleep()
    engine.sleep()  # already asleep: nothing
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1, 2]], 4, 1.0)
    engine.sync(model)
    (m1, a1), (m2, a2), (m3, weights), (m4, a4), (m5, _) = engine.llm.calls
    assert (m1, a1, m2, a2, m3, m4, a4, m5) == ("sleep", 2, "wake_up", ["weights"], "reload_weights", "wake_up",
                                                ["kv_cache"], "reset_prefix_cache")
    assert [k for k, _ in weights] == list(model.state_dict())  # every tensor, never a reload from disk
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, model.state_dict()[k].to(torch.bfloat16)) for k, v in weights)
    engine.llm.calls.clear()
    engine.sync(model)  # awake: no wake-up, weights and a prefix-cache reset only
    assert [c[0] for c in engine.llm.calls] == ["reload_weights", "reset_prefix_cache"]


def test_critic_value_head_stays_fp32_under_bf16_autocast():
    from model import load_critic
    critic = load_critic("tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = critic(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert v.dtype == torch.float32


@pytest.mark.slow  # a benchmark script's check, ~60-85 s: the slow tier (CI runs it), not the default suite
def test_gpu_smoke_runs_every_setting_at_toy_size_on_cpu(tmp_path):
    """bench/gpu_smoke.py, as on a GPU but with a 2-layer model on CPU (gloo): every setting runs 2 iterations."""
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_smoke.py"), "--size", "toy", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out) as f:
        report = json.load(f)
    assert [s["setting"] for s in report["settings"]] == ["fp32-ddp", "bf16-ckpt", "bf16-ckpt-micro", "fsdp-bf16-ckpt",
                                                          "fsdp-bf16-ckpt-micro", "lora-bf16-ckpt-micro",
                                                          "fsdp-lora-bf16-ckpt-micro"]
    for s in report["settings"]:
        if "lora" in s["setting"]:  # adapters (and the value head) only
            assert 0 < s["params"]["trained"] < s["params"]["policy"] + s["params"]["critic"], s["params"]
        assert s["status"] == "ok", (s["setting"], s["error"])
        assert len(s["seconds"]) == 2 and set(s["seconds"][0]) == {"rollout", "forward", "credit", "update", "sync"}
        assert s["peak_gib"]["max"] > 0 and min(s["gen_tokens_per_s"]) > 0 and min(s["train_tokens_per_s"]) > 0
        assert s["skipped_updates"] == 0


def test_bf16_twin_computes_in_bf16_and_steps_fp32_masters():
    """--dtype bf16 in one process: the losses call a bf16 twin; its gradients land, in fp32, on the fp32 masters (two
    micro-batches accumulate in fp32: the master's gradient is the sum of the twin's two, each cast once), AdamW's
    states are fp32, and after the step the twin holds the masters' new weights rounded to bf16. The value head and
    the rotary buffers stay fp32."""
    cfg = train.parse_config(["--dtype", "bf16", "--micro-tokens", "30"])
    policy, policy_ddp, critic, critic_ddp, ref, tok = scale.load_models(cfg, CPU, "step")
    assert policy_ddp is not policy and critic_ddp is not critic
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in policy_ddp.parameters()} == {torch.bfloat16}
    assert critic_ddp.head.weight.dtype == torch.float32 and critic_ddp.backbone.embed_tokens.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for _, b in policy_ddp.named_buffers())  # rotary inv_freq, not rounded
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    trajs = synthetic(0) + synthetic(1)
    b = collate(trajs, tok.pad_token_id, pack=True)
    parts = split_rows(b, 30)
    assert len(parts) >= 2
    want = [torch.zeros_like(p) for p in policy.parameters()]
    for mb in parts:  # the twin's gradient of each micro-batch on its own, summed in fp32
        twin = copy.deepcopy(policy_ddp)
        (step_logprobs(twin, mb, False)[0] * mb.action_step_mask).sum().backward()
        for w, t in zip(want, twin.parameters()):
            w += t.grad.float() if t.grad is not None else 0
    for mb in parts:
        (step_logprobs(policy_ddp, mb, False)[0] * mb.action_step_mask).sum().backward()
    assert all(t.grad is None for t in policy_ddp.parameters())  # moved to the masters as soon as accumulated
    assert all(torch.equal(p.grad, w) for p, w in zip(policy.parameters(), want))
    opt = scale.adamw(scale.trained(policy), 1e-3, cfg)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    assert math.isfinite(scale.optimizer_step(opt, policy_ddp, 1.0))
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert all(torch.equal(t, p.to(torch.bfloat16)) for t, p in zip(policy_ddp.parameters(), policy.parameters()))


@pytest.mark.parametrize("avx512_bf16, amx, dtype, device, warns", [
    (False, False, "bf16", "cpu", True), (True, False, "bf16", "cpu", False), (False, True, "bf16", "cpu", False),
    (False, False, "fp32", "cpu", False), (False, False, "bf16", "cuda", False)])
def test_bf16_on_a_cpu_without_bf16_instructions_is_flagged(monkeypatch, avx512_bf16, amx, dtype, device, warns):
    """--dtype bf16 on a CPU with neither AVX-512 BF16 nor AMX (emulated bf16 products): flagged; not with either of
    them, not for fp32, not on a GPU."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cfg = train.parse_config(["--dtype", dtype])
    assert scale.cpu_emulates_bf16(cfg, torch.device(device)) is warns


def test_bf16_run_resumes_exactly_and_its_engine_matches_the_trainer(tmp_path, capsys):
    """A one-process --dtype bf16 run: the HF engine generates with the bf16 twin, so engine_kl is bf16 noise at most,
    and --resume (masters and Adam states from the checkpoint, the twin refreshed from them) continues exactly. On a
    CPU without bf16 instructions (this one or not) the run says so once, at its start."""
    flags = [*TINY, "--dtype", "bf16", "--micro-tokens", "64", "--iters", "3"]
    full = str(tmp_path / "full")
    train.main(train.parse_config([*flags, "--out", full]))
    warned = capsys.readouterr().err.count("warning: --dtype bf16 on a CPU with neither AVX-512 BF16 nor AMX")
    assert warned == (0 if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else 1)
    cut = str(tmp_path / "cut")
    train.main(train.parse_config([*flags, "--out", cut, "--iters", "1"]))
    train.main(train.parse_config([*flags, "--out", cut, "--resume"]))
    rows = metric_rows(full)
    assert len(rows) == 4 and all(abs(r["engine_kl"]) < 1e-3 for r in rows if "engine_kl" in r)
    assert_same_metrics(rows, metric_rows(cut), exact=True)


def test_keep_freed_memory_stops_large_tensors_faulting_their_pages_again():
    """A 64 MiB tensor made and freed 20 times: glibc's default maps and unmaps it each time (~16,000 page faults per
    tensor); after scale.keep_freed_memory() the freed block is reused (a subprocess: the setting is process-wide)."""
    code = """
import resource, sys, torch, scale
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(16 * 2**20)  # 64 MiB, written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
applied = scale.keep_freed_memory()
faults()  # the first block from the heap faults once
print(default, applied, faults())
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    default, applied, kept = r.stdout.split()
    if applied != "True":
        pytest.skip("not glibc: mallopt is not there")
    assert int(default) > 20 * 10_000 and int(kept) < 1_000, (default, kept)


def test_compiled_layers_compute_what_eager_ones_do_and_generation_stays_eager(one_thread):
    """--compile (scale.compile_layers): generation (forwards with a KV cache) runs the eager layers: no graph is
    compiled and its tokens and log-probs are bit for bit the eager model's; the no-grad pass and the update run the
    compiled layers (graphs appear) and give eager's losses and weights up to fp32 rounding (other fusion, other
    order of sums)."""
    from torch._dynamo.utils import counters
    from conftest import CountEnv
    from rollout import HFEngine, collect
    cfg, trajs, out = train.parse_config(ARGS + ["--compile"]), synthetic(0) + synthetic(1), []
    for compiled in (False, True):
        policy, critic, ref, tok = models()
        for m in (policy, critic, ref) if compiled else ():
            scale.compile_layers(m)
        graphs = counters["stats"]["unique_graphs"]
        gen = collect(HFEngine(policy, tok), [CountEnv() for _ in range(2)], tok, [1, 2], max_steps=2,
                      max_new_tokens=6, temperature=0.0)
        assert counters["stats"]["unique_graphs"] == graphs
        batches, fwd, adv = one_iteration(cfg, policy, critic, ref, trajs, tok.pad_token_id, CPU)
        opt_p, opt_c = torch.optim.SGD(policy.parameters(), lr=0.5), torch.optim.SGD(critic.parameters(), lr=0.5)
        st = learner.update(cfg, policy, critic, opt_p, opt_c, batches, CPU)
        assert (counters["stats"]["unique_graphs"] > graphs) == compiled
        out.append(([(s.action_ids, s.engine_logprobs) for t in gen for s in t.steps], st, fwd["old_lp"],
                    policy.state_dict(), critic.state_dict()))
    (gen_e, st_e, lp_e, pol_e, crit_e), (gen_c, st_c, lp_c, pol_c, crit_c) = out
    assert gen_e == gen_c
    assert torch.allclose(lp_e, lp_c, atol=1e-5)
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "kl_ref"):
        assert st_e[key] == pytest.approx(st_c[key], rel=1e-3, abs=1e-5), key
    for a, b in ((pol_e, pol_c), (crit_e, crit_c)):
        assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in a)


def test_compiled_bf16_update_starts_from_pi_old_bit_for_bit(one_thread):
    """--dtype bf16 --compile (with and without --remove-padding): the update's first forward of the policy (a graph
    compiled with gradients) gives the log-probs the no-grad pass stored as pi_old (a graph compiled without) bit for
    bit, so every step's ratio starts at exactly 1. StepPO clips a step's ratio at 1 +- 3e-4, below bf16's rounding:
    graphs that rounded an intermediate in one place and not in the other clipped most steps before the policy moved
    (scale.compile_layers sets inductor's emulate_precision_casts)."""
    for flags in (["--compile"], ["--compile", "--remove-padding"]):
        cfg = train.parse_config(ARGS + ["--model", "tiny", "--dtype", "bf16", *flags])
        policy, policy_run, critic, critic_run, ref, tok = scale.load_models(cfg, CPU, "step")
        batches, fwd, _ = one_iteration(cfg, policy_run, critic_run, ref, synthetic(0) + synthetic(1), tok.pad_token_id, CPU)
        for m in (m for micro in batches for m in micro):
            lp, _ = step_logprobs(policy_run, m.b, False, cfg.micro_tokens > 0, cfg.remove_padding)  # with gradients
            assert lp.requires_grad and torch.equal(lp.detach(), m.out["old_lp"]), flags


def test_stream_lays_the_real_tokens_end_to_end():
    """unpad.Stream on a hand-worked (2, 4) batch: rows of 3 and 2 real tokens."""
    from unpad import Stream
    mask, ids = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    s = Stream(mask)
    assert s.lengths == [3, 2] and s.index.tolist() == [0, 1, 2, -1, 3, 4, -1, -1] and s.real_at.tolist() == [0, 1, 2, 4, 5]
    inputs = s.inputs(ids)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in inputs and inputs["unpad_stream"] is s
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], requires_grad=True)
    padded = s.pad(values[..., None])[..., 0]
    assert padded.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    (padded * torch.arange(8.0).view(2, 4)).sum().backward()  # each stream value's gradient: its padded place's weight
    assert values.grad.tolist() == [[0, 1, 2, 4, 5]]
    with pytest.raises(ValueError, match="right-padded"):
        Stream(torch.tensor([[0, 1, 1]]))


def test_an_unpadded_forward_through_a_model_not_switched_to_segment_attention_is_refused(one_thread):
    """step_logprobs / critic_outputs with unpadded=True on models whose attention is not unpad's: each row would
    attend to the rows before it in the stream, so they raise instead of returning those numbers."""
    import unpad
    from model import critic_outputs
    policy, critic, _, tok = models()
    b = collate(synthetic(0), tok.pad_token_id, pack=False)
    for forward in (lambda: step_logprobs(policy, b, False, True, True), lambda: critic_outputs(critic, b, True)):
        with pytest.raises(ValueError, match="unpad.use"):
            forward()
    unpad.use(policy), unpad.use(critic)
    step_logprobs(policy, b, False, True, True), critic_outputs(critic, b, True)  # switched: computes


def test_segment_backward_equals_autograd_through_causal_attention(one_thread):
    """unpad.StreamAttention (flash forward per segment, unpad.segment_backward's gradients: what --remove-padding's
    attention uses on CPU with gradients) against autograd through attention written out in fp64 (softmax of masked
    scores) one segment at a time, with grouped heads (GQA), a one-token segment and several segments in one stream."""
    from unpad import StreamAttention
    g = torch.Generator().manual_seed(0)
    for lengths, heads, kv in (([1], 2, 1), ([7], 4, 2), ([33], 6, 3), ([5, 1, 12], 6, 3)):
        T = sum(lengths)
        q, k, v = (torch.randn(1, n, T, 8, generator=g, dtype=torch.float64) for n in (heads, kv, kv))
        d_out = torch.randn(1, T, heads, 8, generator=g, dtype=torch.float64)  # the output's layout (1, T, H, D)
        grads = []
        for own in (True, False):
            x = [t.clone().float().requires_grad_() for t in (q, k, v)] if own else [t.clone().requires_grad_() for t in (q, k, v)]
            if own:
                out = StreamAttention.apply(*x, lengths, 8 ** -0.5)  # (1, T, H, D)
            else:  # the loop-free definition per segment: softmax over its keys at or before each query
                parts, start = [], 0
                for n in lengths:
                    qq, kk, vv = (t[:, :, start:start + n] for t in x)
                    kk, vv = (t.repeat_interleave(heads // kv, 1) for t in (kk, vv))
                    scores = (qq @ kk.transpose(-1, -2)) * 8 ** -0.5
                    parts.append(scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1) @ vv)
                    start += n
                out = torch.cat(parts, 2).transpose(1, 2)
            (out * (d_out.float() if own else d_out)).sum().backward()
            grads.append([out.detach().double()] + [t.grad.double() for t in x])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-5), (lengths, heads, kv)


@pytest.mark.parametrize("pack", [True, False])
def test_remove_padding_computes_what_padded_rows_do_and_generation_is_unchanged(pack, one_thread):
    """--remove-padding (unpad.py): the no-grad pass (pi_old, reference, critic values) and the update give the padded
    batch's numbers up to fp32 rounding, on micro-batches that hold padding; generation (padded prompts, a KV cache)
    through the segment attention is bit for bit transformers' SDPA."""
    import unpad
    from conftest import CountEnv
    from rollout import HFEngine, collect
    flags = ARGS + ["--micro-tokens", "1000"] + ([] if pack else ["--no-pack"])  # rows of several lengths together
    trajs, out = synthetic(0) + synthetic(1), []
    for unpadded in (False, True):
        cfg = train.parse_config(flags + ["--remove-padding"] * unpadded)
        policy, critic, ref, tok = models()
        for m in (policy, critic, ref) if unpadded else ():
            unpad.use(m)
        gen = collect(HFEngine(policy, tok), [CountEnv() for _ in range(3)], tok, [1, 2, 3], max_steps=2,
                      max_new_tokens=6, temperature=1.0, seed=0)
        batches, fwd, adv = one_iteration(cfg, policy, critic, ref, trajs, tok.pad_token_id, CPU)
        assert any((m.b.attention_mask == 0).any() for mb in batches for m in mb)  # there is padding to remove
        opt_p, opt_c = torch.optim.SGD(policy.parameters(), lr=0.5), torch.optim.SGD(critic.parameters(), lr=0.5)
        st = learner.update(cfg, policy, critic, opt_p, opt_c, batches, CPU)
        out.append(([(s.action_ids, s.engine_logprobs) for t in gen for s in t.steps], fwd, st,
                    policy.state_dict(), critic.state_dict()))
    (gen_p, fwd_p, st_p, pol_p, crit_p), (gen_u, fwd_u, st_u, pol_u, crit_u) = out
    assert gen_p == gen_u
    for key in ("old_lp", "ref_lp", "v_step", "v_tok"):
        assert torch.allclose(fwd_p[key], fwd_u[key], atol=1e-5), key
    assert fwd_p["v_step"].abs().max() > 1e-3  # the critic's values are not all zero (a random value head)
    for key in ("policy_loss", "value_loss", "approx_kl", "entropy", "kl_ref"):
        assert st_p[key] == pytest.approx(st_u[key], rel=1e-3, abs=1e-5), key
    for a, b in ((pol_p, pol_u), (crit_p, crit_u)):
        assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in a)


@pytest.mark.parametrize("flags", [["--grad-ckpt"], ["--lora-rank", "4", "--kl-coef", "0.1"]], ids=["grad-ckpt", "lora"])
def test_remove_padding_under_grad_ckpt_and_lora_computes_what_padded_rows_do(flags, one_thread):
    """--remove-padding with --grad-ckpt (the checkpointed layers recompute through the stream) and with --lora-rank
    (the adapters train; the reference is the policy with its adapters off): models as train.py loads them give the
    padded batch's pi_old, reference, values, losses and updated weights up to fp32 rounding."""
    trajs, out = synthetic(0) + synthetic(1), []
    for unpadded in (False, True):
        torch.manual_seed(0)  # the same adapters' initial A in both
        cfg = train.parse_config(ARGS + ["--micro-tokens", "1000", *flags] + ["--remove-padding"] * unpadded)
        policy, policy_ddp, critic, critic_ddp, ref, tok = scale.load_models(cfg, CPU, "step")
        assert policy_ddp.is_gradient_checkpointing == ("--grad-ckpt" in flags)
        with torch.no_grad():  # a non-zero value head: the critic's values and gradients are not all zero
            critic.head.weight.copy_(torch.randn(critic.head.weight.shape, generator=torch.Generator().manual_seed(0)))
        batches, fwd, adv = one_iteration(cfg, policy_ddp, critic_ddp, ref, trajs, tok.pad_token_id, CPU)
        assert any((m.b.attention_mask == 0).any() for mb in batches for m in mb)  # there is padding to remove
        opt_p, opt_c = (torch.optim.SGD(scale.trained(m), lr=0.5) for m in (policy, critic))  # (AdamW magnifies rounding)
        start = {k: v.clone() for k, v in policy.state_dict().items()}
        stats = [learner.update(cfg, policy_ddp, critic_ddp, opt_p, opt_c, batches, CPU) for _ in range(2)]  # LoRA: B, then A moves
        assert any(not torch.equal(start[k], v) for k, v in policy.state_dict().items())  # the updates moved the policy
        out.append((fwd, stats, policy.state_dict(), critic.state_dict()))
    (fwd_p, st_p, pol_p, crit_p), (fwd_u, st_u, pol_u, crit_u) = out
    for key in ("old_lp", "ref_lp", "v_step"):
        assert torch.allclose(fwd_p[key], fwd_u[key], atol=1e-5), key
    for a, b in zip(st_p, st_u):
        for key in ("policy_loss", "value_loss", "approx_kl", "entropy", "kl_ref"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
    for a, b in ((pol_p, pol_u), (crit_p, crit_u)):
        assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in a)
