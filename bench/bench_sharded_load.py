"""Host memory of train.py's start-up under --fsdp (issue 31): peak resident memory of each of 2 processes after the
policy, the critic and the reference are loaded, sharded and built (before the rollout engine), for scale.load_full
(every process reads the checkpoint whole, then shards: the path before) and scale.load_sharded (meta-device
build, rank 0 reads, shards filled by broadcast; critic and reference copied from the policy's shards). The model:
a random-initialised Qwen2 of ~135M parameters (SmolLM2-135M's shape, tied embeddings) saved as a normal model
folder, fp32; the tiny model gives the processes' runtime baseline. "Copies" = (peak - the tiny model's peak in the
same mode) / the fp32 weights' size. Writes bench/results/sharded_load.json.

    python bench/bench_sharded_load.py        # ~2 minutes on 2 CPU cores, ~1.2 GB of disk in a temp folder
"""
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_folder(path):
    """A random Qwen2 model folder (config, safetensors, generation config) with the tiny model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    import model as M
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    m.save_pretrained(path)
    M.load_tokenizer("tiny").save_pretrained(path)
    return sum(p.numel() for p in m.parameters()), os.path.getsize(os.path.join(path, "model.safetensors"))


def worker(mode, model, out):
    """One process of `torchrun`: load as train.py does, then report this process's peak RSS."""
    import scale
    import train
    rank, world, device = scale.setup_distributed()
    cfg = train.parse_config(["--fsdp", "--model", model])
    t = time.time()
    (scale.load_sharded if mode == "sharded" else scale.load_full)(cfg, device, "step")
    seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open(os.path.join(out, f"{mode}-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "peak_rss_mib": peak / 1024, "load_s": seconds}, f)
    scale.teardown()


def run(mode, model, out, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.abspath(__file__), "--worker", mode, model, out]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    rows = [json.load(open(os.path.join(out, f"{mode}-{k}.json"))) for k in (0, 1)]
    return [round(x["peak_rss_mib"]) for x in rows], [round(x["load_s"], 2) for x in rows]


def main():
    import torch
    import transformers
    tmp = tempfile.mkdtemp()
    try:
        folder = os.path.join(tmp, "qwen2-135m")
        params, size = build_folder(folder)
        weights_mib = params * 4 / 2**20
        out = {"date": time.strftime("%Y-%m-%d"), "machine": dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                                                                  python=platform.python_version()),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
               "model": {"params": params, "fp32_weights_mib": round(weights_mib), "safetensors_mib": round(size / 2**20)},
               "command": "torchrun --nproc_per_node 2 (gloo, CPU): scale.load_full / scale.load_sharded with --fsdp",
               "peak_rss_mib_per_rank": {}, "load_s_per_rank": {}, "copies_per_rank": {}}
        port = 29650
        for mode in ("full", "sharded"):
            for name, model in (("tiny", "tiny"), ("qwen2-135m", folder)):
                port += 1
                rss, secs = run(mode, model, tmp, port)
                out["peak_rss_mib_per_rank"][f"{mode}/{name}"] = rss
                out["load_s_per_rank"][f"{mode}/{name}"] = secs
                print(mode, name, "peak RSS MiB per rank", rss, "load s", secs, flush=True)
            base = out["peak_rss_mib_per_rank"][f"{mode}/tiny"]
            big = out["peak_rss_mib_per_rank"][f"{mode}/qwen2-135m"]
            out["copies_per_rank"][mode] = [round((b - a) / weights_mib, 2) for a, b in zip(base, big)]
        print("copies of the weights per rank (rank 0 reads):", out["copies_per_rank"])
        path = os.path.join(ROOT, "bench", "results", "sharded_load.json")
        json.dump(out, open(path, "w"), indent=1)
        print("wrote", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        main()
