"""Does train.py fit at a real model's size? A random-initialised model of the shape of Qwen2.5-1.5B-Instruct (or
7B; nothing is downloaded), a critic and a reference of the same shape, and `--iters` iterations of train.py's own
machinery per setting: HF-engine rollout (window context, every step a fresh prompt), no_grad_pass,
compute_advantages, update (Adam, two steps so its states exist), the weight export a vLLM sync streams.

    torchrun --standalone --nproc_per_node 1 ...   # what each setting runs under (one fresh process per setting)
    python bench/gpu_smoke.py --size 1.5b          # one CUDA GPU (nccl): bench/results/gpu_smoke_1.5b.json, rewritten
                                                   # after every setting (a lent machine may go mid-run)
    python bench/gpu_smoke.py --size 7b --settings fsdp-bf16-ckpt-micro
    python bench/gpu_smoke.py --size toy           # CPU (gloo), seconds: the test suite runs this
    python bench/gpu_smoke.py --size vocab-cpu     # CPU, minutes: Qwen's 151,936-token vocabulary on a 2-layer model

JSON: {"machine", "size", "model" (the config), "workload", "iters", "nproc", "settings": [{"setting", "flags",
"status": ok | oom | error | crashed, "phase" (where it stopped), "error", "world", "device", "params",
"peak_gib" (CUDA: max_memory_allocated within each phase, and "max"; CPU: the process's peak resident set so far
at the end of each phase, so only "max" compares settings), "seconds" (per iteration: rollout, forward, credit,
update, sync), "gen_tokens_per_s", "train_tokens_per_s" (per iteration), "skipped_updates"}]}.
With one process FSDP shards nothing: its numbers show the layout's overheads, not 8-way sharding (docs/scaling.md
has the arithmetic for 8 GPUs).
"""
import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=None)
SIZES = {  # Qwen2.5-*-Instruct shapes (their config.json); workload: per process, one minibatch of `trajs`
    "1.5b": dict(config=dict(QWEN, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
                 workload=dict(trajs=8, steps=30, prompt=1200, action=64, micro_tokens=16384, gen_batch=60)),
    "7b": dict(config=dict(QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
               workload=dict(trajs=8, steps=30, prompt=1200, action=64, micro_tokens=8192, gen_batch=30)),
    "vocab-cpu": dict(config=dict(QWEN, vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
                      workload=dict(trajs=4, steps=4, prompt=256, action=32, micro_tokens=1024, gen_batch=16)),
    "toy": dict(config=dict(vocab_size=1088, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                            tie_word_embeddings=True, bos_token_id=None),
                workload=dict(trajs=4, steps=3, prompt=40, action=8, micro_tokens=100, gen_batch=6)),
}
SETTINGS = {  # "{micro}" is the size's micro_tokens
    "fp32-ddp": [],
    "bf16-ckpt": ["--dtype", "bf16", "--grad-ckpt"],
    "bf16-ckpt-micro": ["--dtype", "bf16", "--grad-ckpt", "--micro-tokens", "{micro}"],
    "fsdp-bf16-ckpt": ["--fsdp", "--dtype", "bf16", "--grad-ckpt"],
    "fsdp-bf16-ckpt-micro": ["--fsdp", "--dtype", "bf16", "--grad-ckpt", "--micro-tokens", "{micro}"],
    "lora-bf16-ckpt-micro": ["--lora-rank", "16", "--dtype", "bf16", "--grad-ckpt", "--micro-tokens", "{micro}"],
    "fsdp-lora-bf16-ckpt-micro": ["--fsdp", "--lora-rank", "16", "--dtype", "bf16", "--grad-ckpt", "--micro-tokens",
                                  "{micro}"],
}


def rollout(engine, policy, w, it):
    """One iteration's trajectories (window context): per step a fresh random prompt and the action the HF engine
    samples for it (a random model rarely says EOS: actions run to max length); reward 1 at the end of every
    other trajectory."""
    import scale
    from step_mdp import Step, Trajectory
    g = torch.Generator().manual_seed(it)
    n = w["trajs"] * w["steps"]
    prompts = [torch.randint(10, 1000, (w["prompt"],), generator=g).tolist() for _ in range(n)]
    outs = []
    policy.eval()
    with scale.unsharded(policy):
        for i in range(0, n, w["gen_batch"]):
            outs += engine.generate(prompts[i:i + w["gen_batch"]], w["action"], 1.0, seed=1000 * it + i)
    policy.train()
    T = w["steps"]
    return [Trajectory([Step(prompts[k * T + t], *outs[k * T + t], reward=float(t == T - 1 and k % 2)) for t in range(T)],
                       f"task{k}", terminated=True) for k in range(w["trajs"])]


def child(args):
    """One setting in this (torchrun) process; rank 0 writes the result to args.json."""
    import scale
    import learner
    import train
    from model import Critic, load_tokenizer, lora_scale, merged_weights
    from rollout import HFEngine
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model
    rank, world, device = scale.setup_distributed()
    cuda = device.type == "cuda"
    w = SIZES[args.size]["workload"]
    flags = [f.replace("{micro}", str(w["micro_tokens"])) for f in SETTINGS[args.setting]]
    cfg = train.parse_config(flags + ["--minibatch-size", str(w["trajs"]), "--max-new-tokens", str(w["action"]),
                                      "--context", "window", "--sft-steps", "0", "--lr", "1e-6", "--critic-lr", "1e-5",
                                      "--out", tempfile.mkdtemp()])
    res = {"setting": args.setting, "flags": flags, "status": "ok", "phase": None, "error": None, "world": world,
           "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
           "peak_gib": {}, "seconds": [], "gen_tokens_per_s": [], "train_tokens_per_s": []}

    def mark(name):  # end of a phase: its peak memory (CUDA: since the last mark; CPU: the process's peak so far)
        if cuda:
            torch.cuda.synchronize(device)
            res["peak_gib"][name] = max(res["peak_gib"].get(name, 0), torch.cuda.max_memory_allocated(device) / 2**30)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            res["peak_gib"][name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return time.time()

    phase = "build"
    try:
        torch.manual_seed(0)
        config = Qwen2Config(**SIZES[args.size]["config"])
        with torch.device(device):  # random weights made where they live
            policy, critic = Qwen2ForCausalLM(config), Critic(Qwen2Model(config))
        policy, critic.backbone = scale.adapt(policy, cfg), scale.adapt(critic.backbone, cfg)  # as scale.load_models
        scale.store_frozen(cfg, policy, critic)
        ref = scale.cast(copy.deepcopy(policy), scale.DTYPES[cfg.dtype]) if cfg.kl_coef > 0 and not cfg.lora_rank else None
        policy_w, critic_w = scale.prepare(policy, cfg, device), scale.prepare(critic, cfg, device)
        ref = scale.prepare(ref.eval().requires_grad_(False), cfg, device, train=False) if ref is not None else \
            (policy if cfg.lora_rank and cfg.kl_coef > 0 else None)  # LoRA: the policy with its adapters off
        opt_p, opt_c = scale.adamw(scale.trained(policy), cfg.lr, cfg), scale.adamw(scale.trained(critic), cfg.critic_lr, cfg)
        tok = load_tokenizer("tiny")  # ids < 1088 fit any vocabulary; only eos/pad are read
        computes = scale.unwrap(policy_w)  # under --dtype bf16 in one process: the bf16 twin
        engine, pad = HFEngine(computes, tok), tok.pad_token_id
        res["params"] = {"policy": sum(p.numel() for p in policy.parameters()),
                         "critic": sum(p.numel() for p in critic.parameters()),
                         "trained": sum(p.numel() for m in (policy, critic) for p in scale.trained(m))}
        t = mark("build")
        for it in range(args.iters):
            sec = {}
            phase = "rollout"
            trajs = rollout(engine, computes, w, it)
            sec[phase], t = mark(phase) - t, time.time()
            phase = "forward"
            batches = learner.minibatches(cfg, trajs, pad, device, torch.Generator().manual_seed(it))
            lps = learner.no_grad_pass(cfg, computes, scale.unwrap(critic_w), ref, batches, trajs, pad, device)
            sec[phase], t = mark(phase) - t, time.time()
            phase = "credit"
            learner.compute_advantages(cfg, trajs, batches, lps["boot"], device)
            sec[phase], t = mark(phase) - t, time.time()
            phase = "update"
            st = learner.update(cfg, policy_w, critic_w, opt_p, opt_c, batches, device)
            sec[phase], t = mark(phase) - t, time.time()
            phase = "sync"  # what VLLMEngine.sync streams: every tensor gathered (LoRA: merged), cast to bf16
            tensors = ((k, scale.gather(v.detach())) for k, v in policy.state_dict().items())
            for _, v in merged_weights(tensors, lora_scale(policy)):
                v.to(torch.bfloat16)
            sec[phase], t = mark(phase) - t, time.time()
            res["seconds"].append(sec)
            res["gen_tokens_per_s"].append(sum(len(s.action_ids) for tr in trajs for s in tr.steps) / sec["rollout"])
            res["train_tokens_per_s"].append(st["train_tokens"] / sec["update"])
            res["skipped_updates"] = st["skipped_updates"]
    except torch.OutOfMemoryError as e:
        res.update(status="oom", phase=phase, error=str(e).splitlines()[0][:300])
    except Exception:
        res.update(status="error", phase=phase, error=traceback.format_exc()[-2000:])
    if cuda:
        res["peak_gib"]["max"] = max(res["peak_gib"].values(), default=0)
    elif res["peak_gib"]:
        res["peak_gib"]["max"] = max(res["peak_gib"].values())
    if rank == 0:
        with open(args.json, "w") as f:
            json.dump(res, f)
    if world > 1 and res["status"] == "ok":  # leave together (see the end of train.main)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5b", choices=sorted(SIZES))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS))
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=1, help="processes per setting (torchrun --nproc_per_node)")
    ap.add_argument("--out", default=None, help="default: bench/results/gpu_smoke_<size>.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    out = args.out or os.path.join(ROOT, "bench", "results", f"gpu_smoke_{args.size}.json")
    results = []
    machine, cuda = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", torch.cuda.is_available()
    report = {"machine": machine, "size": args.size, "model": SIZES[args.size]["config"],
              "workload": SIZES[args.size]["workload"], "iters": args.iters, "nproc": args.nproc,
              "settings": results}  # results grows setting by setting
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for name in args.settings.split(","):
        part = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               os.path.abspath(__file__), "--child", "--setting", name, "--size", args.size, "--iters", str(args.iters),
               "--json", part]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if os.path.exists(part):
            with open(part) as f:
                results.append(json.load(f))
            os.remove(part)
        else:  # killed before it could write (the host's OOM killer, a signal)
            results.append({"setting": name, "status": "crashed", "returncode": r.returncode, "error": r.stderr[-2000:]})
        res = results[-1]
        sec = res.get("seconds") or [{}]
        print(f"{name:22s} {res['status']:7s} peak {res.get('peak_gib', {}).get('max', float('nan')):7.2f} GiB  "
              f"last iteration {sum(sec[-1].values()):7.1f} s  {res.get('phase') or ''} {(res.get('error') or '')[:80]}",
              flush=True)
        # the GPU as the settings name it: the parent calls no CUDA function but is_available() while they run
        gpu = next((x["device"] for x in results if x.get("device")), "unknown GPU") if cuda else "no CUDA"
        report["machine"] = f"{machine}, {gpu}"
        # written after every setting (atomically): a machine lent for minutes may be taken back mid-run
        with open(out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(out + ".tmp", out)
    return report


if __name__ == "__main__":
    main()
