"""LoRA (--lora-rank, model.add_adapters): only the adapters (and the critic's value head) train, the reference is the
base model, engines and final/ get the merged weights W + (alpha / rank) B A, checkpoints hold what trains."""
import os

import pytest
import torch
from safetensors.torch import load_file

import scale
import learner
import train
from conftest import CountEnv, assert_same_metrics, one_iteration, forward_logprobs, metric_rows, torchrun_train
from dist_worker import ARGS, synthetic
from model import adapters_off, add_adapters, load_critic, load_policy, lora_scale, merged_weights, save_adapter

CPU = torch.device("cpu")
RUN = ["--iters", "2", "--envs-per-iter", "4", "--group-size", "2", "--max-steps", "3", "--max-new-tokens", "10",
       "--sft-steps", "3", "--sft-episodes", "4", "--eval-episodes", "2", "--eval-every", "1", "--minibatch-size", "2",
       "--env-kwargs", '{"invalid_penalty": 0.1}', "--lora-rank", "4", "--kl-coef", "0.01"]


def adapted(seed=0, rank=4, alpha=8.0):
    """The tiny policy with adapters whose B is random (a zero B would hide mistakes in the merge)."""
    policy, tok = load_policy("tiny")
    torch.manual_seed(seed)
    policy = add_adapters(policy, rank, alpha)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return policy, tok


def test_merged_weights_by_hand_and_against_a_loop():
    """W (2, 3), A (1, 3), B (2, 1), scale 2: W' = W + 2 B A, worked out by hand; then a random layer against a loop
    over W'[i, j] = W[i, j] + s * sum_r B[i, r] A[r, j]; the bias is renamed, the adapters are gone."""
    W, A, B = torch.tensor([[1., 0., 2.], [0., 1., 0.]]), torch.tensor([[1., 2., 3.]]), torch.tensor([[1.], [-1.]])
    out = dict(merged_weights([("l.base_layer.weight", W), ("l.base_layer.bias", torch.ones(2)),
                               ("l.lora_A.default.weight", A), ("l.lora_B.default.weight", B), ("n.weight", W)], 2.0))
    assert sorted(out) == ["l.bias", "l.weight", "n.weight"]
    assert torch.equal(out["l.weight"], torch.tensor([[3., 4., 8.], [-2., -3., -6.]])) and torch.equal(out["n.weight"], W)
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    slow = torch.tensor([[W[i, j] + 0.5 * sum(B[i, r] * A[r, j] for r in range(3)) for j in range(7)] for i in range(5)])
    fast = dict(merged_weights([("l.lora_B.default.weight", B), ("l.lora_A.default.weight", A),
                                ("l.base_layer.weight", W)], 0.5))["l.weight"]
    assert torch.allclose(fast, slow, atol=1e-6)
    assert list(merged_weights([("x.weight", W)], None)) == [("x.weight", W)]  # no adapters: unchanged
    with pytest.raises(ValueError, match="without their base weight"):
        list(merged_weights([("l.lora_A.default.weight", A)], 0.5))


def test_adapters_start_as_the_base_model_switch_off_exactly_and_merge(tmp_path, one_thread):
    """B = 0 at the start: the adapted model is the base model. With B random: adapters_off gives the base model's
    logits bit for bit (the KL reference), the merged state dict loads into a plain model that gives the adapted
    logits (float noise), and save_adapter's folder is what peft.PeftModel.from_pretrained reads."""
    from peft import PeftModel
    base, _ = load_policy("tiny")
    x = torch.randint(5, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = base(input_ids=x).logits
        fresh = add_adapters(load_policy("tiny")[0], 4, 8.0)
        assert torch.allclose(fresh(input_ids=x).logits, want, atol=0, rtol=0)
        assert sum(p.numel() for p in scale.trained(fresh)) == sum(
            p.numel() for n, p in fresh.named_parameters() if ".lora_" in n) > 0
        policy, _ = adapted()
        got = policy(input_ids=x).logits
        assert (got - want).abs().max() > 1e-2
        with adapters_off(policy):
            assert torch.equal(policy(input_ids=x).logits, want)
        assert torch.equal(policy(input_ids=x).logits, got)  # switched back on
        plain, _ = load_policy("tiny")
        plain.load_state_dict(dict(merged_weights(policy.state_dict().items(), lora_scale(policy))))
        assert torch.allclose(plain(input_ids=x).logits, got, atol=1e-5)
        save_adapter(policy, policy.state_dict(), str(tmp_path), "tiny")
        peft_model = PeftModel.from_pretrained(load_policy("tiny")[0], str(tmp_path))
        assert torch.allclose(peft_model(input_ids=x).logits, got, atol=1e-6)
    with pytest.raises(ValueError, match="lora-targets"):
        add_adapters(load_policy("tiny")[0], 4, 8.0, "no_such_layer")
    with pytest.raises(SystemExit, match="--lora-targets 'q_proj,nope'"):  # what train.py says: one line, no trace
        scale.load_models(train.parse_config(["--lora-rank", "4", "--lora-targets", "q_proj,nope"]), CPU, "")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_update_changes_only_the_adapters_and_the_value_head(dtype, one_thread):
    """One warm-start step and two RL updates (KL to the reference on): every base weight of the policy and of the
    critic is bit-identical, every adapter and the value head moved; the reference's log-probs (the policy with
    its adapters off) equal the base model's. --dtype bf16 (no --fsdp): the frozen weights are stored in bf16, what
    trains in fp32; with --grad-ckpt the adapters still get their gradients (non-reentrant checkpointing)."""
    cfg = train.parse_config(ARGS + ["--lora-rank", "4", "--kl-coef", "0.1", "--sft-steps", "1", "--dtype", dtype,
                                     *(["--grad-ckpt"] if dtype == "bf16" else [])])  # frozen inputs, checkpointed
    policy, _, critic, _, ref, tok = scale.load_models(cfg, CPU, "step")
    assert ref is policy  # no second copy of the weights
    for model in (policy, critic):
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {scale.DTYPES[dtype]}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with torch.no_grad():  # a non-zero head, so the critic's adapters get gradients from the first step
        critic.head.weight.copy_(torch.randn(critic.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    before = {"policy": {k: v.clone() for k, v in policy.state_dict().items()},
              "critic": {k: v.clone() for k, v in critic.state_dict().items()}}
    trajs = synthetic(0) + synthetic(1)
    learner.warm_start(cfg, policy, torch.optim.AdamW(scale.trained(policy), lr=1e-2), trajs, tok.pad_token_id, CPU,
                     torch.Generator())
    batches, fwd, adv = one_iteration(cfg, policy, critic, ref, trajs, tok.pad_token_id, CPU)
    base, _ = load_policy("tiny", dtype=scale.DTYPES[dtype])
    for t in trajs[:2] if dtype == "fp32" else []:  # (bf16: autocast here, not in a plain forward)  # ref_lp: the base model's log-probs of each step's actions
        for s, step in enumerate(t.steps):
            k = trajs.index(t)
            want = forward_logprobs(base, step.prompt_ids, step.action_ids)
            assert torch.allclose(fwd["ref_lp"][k, s, :len(step.action_ids)], want, atol=1e-5)
    assert not torch.allclose(fwd["ref_lp"], fwd["old_lp"], atol=1e-3)  # the warm start moved the adapters
    opt_p, opt_c = torch.optim.AdamW(scale.trained(policy), lr=1e-2), torch.optim.AdamW(scale.trained(critic), lr=1e-2)
    for _ in range(2):  # B starts at 0, so A's gradient is 0 in an adapter's first step
        learner.update(cfg, policy, critic, opt_p, opt_c, batches, CPU)
    for name, model in (("policy", policy), ("critic", critic)):
        for k, v in model.state_dict().items():
            trains = ".lora_" in k or k.startswith("head.")
            assert torch.equal(v, before[name][k]) != trains, (name, k)


def test_lora_run_resumes_exactly_and_writes_a_merged_final_with_its_adapter(tmp_path):
    """train.py --lora-rank 4: checkpoints hold the adapters, the value head and the optimiser states (no base
    weight); --resume from iteration 0's gives the uninterrupted run's metrics; final/ is a plain model that
    AutoModelForCausalLM loads, equal to --model's weights merged with final/adapter/ (so the base never changed), and
    peft loads the adapter; run.json records peft's version."""
    import json
    import shutil

    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train.main(train.parse_config([*RUN, "--out", full]))
    keys = FileSystemReader(os.path.join(full, "ckpt-1")).read_metadata().state_dict_metadata
    weights = [k for k in keys if ".optim." not in k and not k.startswith("ref.")]
    assert weights and all(".lora_" in k or k.startswith("critic.model.head.") for k in weights), weights[:5]
    assert not any(k.startswith("ref.") for k in keys)  # the reference is the policy's base: nothing to save
    os.makedirs(cut)
    shutil.copytree(os.path.join(full, "ckpt-0"), os.path.join(cut, "ckpt-0"))
    train.main(train.parse_config([*RUN, "--out", cut, "--resume"]))
    rows, resumed = metric_rows(full), metric_rows(cut)
    assert [r["iter"] for r in rows] == [0, 1, 2] and rows[0]["kl_ref"] > 0
    assert_same_metrics(rows, resumed, exact=True)
    final = AutoModelForCausalLM.from_pretrained(os.path.join(full, "final"))
    adapter = load_file(os.path.join(full, "final", "adapter", "adapter_model.safetensors"))
    base, _ = load_policy("tiny")
    state = {**base.state_dict(), **{k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.")
                                     .replace(".lora_B.", ".lora_B.default."): v for k, v in adapter.items()}}
    for k in [k.removesuffix(".lora_A.default.weight") for k in state if k.endswith(".lora_A.default.weight")]:
        state[k + ".base_layer.weight"] = state.pop(k + ".weight")
        if k + ".bias" in state:
            state[k + ".base_layer.bias"] = state.pop(k + ".bias")
    merged = dict(merged_weights(state.items(), 16.0 / 4))
    assert all(torch.equal(v, merged[k]) for k, v in final.state_dict().items())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters learned something
    config = json.load(open(os.path.join(full, "final", "adapter", "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 16.0, "tiny")
    run = json.load(open(os.path.join(full, "run.json")))["starts"][0]
    assert run["config"]["lora_rank"] == 4 and "peft" in run["versions"]


@pytest.mark.slow  # two torchrun runs, 41-118 s on 2 cores (bf16 without bf16 instructions the longest): CI's slow tier
def test_lora_under_fsdp_bf16_two_processes_resumes_exactly(tmp_path):
    """torchrun --nproc_per_node 2 --fsdp --dtype bf16 --lora-rank 4 (gloo, CPU): FSDP2 shards units whose base
    weights are frozen and whose adapters train; the sharded load fills the adapters from rank 0; resuming from
    iteration 0's sharded checkpoint gives the same metrics; final/ is merged and loads."""
    import shutil
    flags = [*RUN, "--fsdp", "--dtype", "bf16", "--micro-tokens", "64", "--eval-episodes", "1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    r = torchrun_train([*flags, "--out", full], port=29551)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metric_rows(full)
    assert [row["iter"] for row in rows] == [0, 1, 2] and rows[0]["value_loss"] > 0 and rows[0]["skipped_updates"] == 0
    assert abs(rows[0]["engine_kl"]) < 1e-3
    os.makedirs(cut)
    shutil.copytree(os.path.join(full, "ckpt-0"), os.path.join(cut, "ckpt-0"))
    r = torchrun_train([*flags, "--out", cut, "--resume"], port=29552)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_metrics(rows, metric_rows(cut))
    a, b = load_policy(os.path.join(full, "final"))[0], load_policy(os.path.join(cut, "final"))[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert os.path.isfile(os.path.join(full, "final", "adapter", "adapter_model.safetensors"))


def test_hf_engine_on_an_adapted_policy_is_token_in_token_out(one_thread):
    """The HF engine generates with the adapted model itself (the merged weights, by construction): every step's
    engine log-probs equal a trainer forward pass of the same ids, 1e-4 in fp32; a critic with adapters on its
    backbone still starts at V = 0."""
    from rollout import HFEngine, collect
    policy, tok = adapted()
    trajs = collect(HFEngine(policy, tok), [CountEnv(), CountEnv()], tok, [0, 1], 3, 8, 1.0, seed=0)
    for t in trajs:
        for s in t.steps:
            assert torch.allclose(forward_logprobs(policy, s.prompt_ids, s.action_ids), torch.tensor(s.engine_logprobs),
                                  atol=1e-4)
    critic = load_critic("tiny")
    critic.backbone = add_adapters(critic.backbone, 4, 8.0)
    assert critic(torch.tensor([[5, 6, 7]])).abs().max() == 0
    assert {n for n, p in critic.named_parameters() if p.requires_grad} >= {"head.weight", "head.bias"}
