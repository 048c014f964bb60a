"""torchrun worker for tests/test_scale.py's sharded-load tests (2 gloo processes).

    torchrun --nproc_per_node 2 tests/sharded_load_worker.py check OUT FLAGS...   # weights after scale.load_sharded
    torchrun --nproc_per_node 2 tests/sharded_load_worker.py train-sharded|train-full OUT FLAGS...  # train.py --fsdp
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scale  # noqa: E402
import train  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402


def full(model):
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # every process calls


def check(out, flags):
    """Every parameter and buffer after the sharded load against the checkpoint read the plain way."""
    from model import load_critic, load_policy
    rank, world, device = scale.setup_distributed()
    cfg = train.parse_config(["--fsdp", *flags])
    policy, _, critic, _, ref, _ = scale.load_sharded(cfg, device, "step")
    got = {"policy": full(policy), "critic": full(critic), "ref": full(ref)}
    result = {"tied": policy.lm_head.weight is policy.model.embed_tokens.weight,
              "buffers": {n: b.tolist() for n, b in policy.named_buffers()}}
    if rank == 0:
        want, _ = load_policy(cfg.model)
        want_critic = load_critic(cfg.critic_model or cfg.model)
        sd = want.state_dict()
        result["policy_equal"] = sorted(got["policy"]) == sorted(sd) and all(
            torch.equal(got["policy"][k], v) for k, v in sd.items())
        csd = want_critic.state_dict()
        result["critic_equal"] = sorted(got["critic"]) == sorted(csd) and all(
            torch.equal(got["critic"][k], v) for k, v in csd.items())
        result["ref_bf16_of_policy"] = all(got["ref"][k].dtype == torch.bfloat16 and torch.equal(
            got["ref"][k], v.to(torch.bfloat16)) for k, v in sd.items())
        result["buffers_equal"] = all(torch.equal(b, dict(want.named_buffers())[n]) for n, b in policy.named_buffers())
        result["lm_head_is_embedding"] = torch.equal(got["policy"]["lm_head.weight"], got["policy"]["model.embed_tokens.weight"])
        json.dump(result, open(os.path.join(out, "check.json"), "w"))
    scale.teardown()


if __name__ == "__main__":
    mode, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "check":
        check(out, flags)
    else:
        if mode == "train-full":  # the path before load_sharded: every process reads everything, then shards
            scale.load_sharded = scale.load_full
        train.main(train.parse_config(["--fsdp", "--out", os.path.join(out, mode), *flags]))
