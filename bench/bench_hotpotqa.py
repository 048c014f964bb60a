"""HotpotQA search speed: BM25 (bm25s) index build time, size on disk, cached load time and per-query latency, in
the "distractor" setting (one 10-paragraph index per question, built at reset) and the "corpus" setting (one
cached index), on the generated sample and on synthetic corpora of Wikipedia-paragraph size. Writes
bench/results/hotpotqa.json.

    python bench/bench_hotpotqa.py                   # ~5 minutes on 2 CPU cores (1 thread)
    python bench/bench_hotpotqa.py --sizes 100000    # a quick run

Synthetic paragraphs: a title of 2 words drawn uniformly + 80 words drawn from a Zipf(1.1) law over a 300k-word
vocabulary (HotpotQA paragraphs are a few sentences long); queries are titles and 8 words from a paragraph.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
from envs import hotpotqa  # noqa: E402


def stats(xs):
    return dict(n=len(xs), mean_ms=1e3 * statistics.mean(xs), median_ms=1e3 * statistics.median(xs),
                p99_ms=1e3 * sorted(xs)[int(0.99 * (len(xs) - 1))])


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def folder_mib(folder, names=None):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if names is None or f in names) / 2**20


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(n, rng, vocab, words=80):
    """n paragraphs {"title", "text"} of Zipf-distributed pseudo-words."""
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    ids = rng.choice(len(vocab), size=(n, words), p=p / p.sum())
    names = rng.choice(len(vocab), size=(n, 2))  # titles: two words drawn uniformly (names are rare words)
    return [{"title": "%s %s" % (vocab[a], vocab[b]), "text": " ".join(vocab[i] for i in r) + "."}
            for (a, b), r in zip(names, ids)]


def query_times(index, queries, k=5):
    times = []
    for q in queries:
        _, dt = timed(hotpotqa.bm25_top, index, q, k)
        times.append(dt)
    return stats(times)


def bench_corpus(passages, cache, label, rng):
    """Build (cold), load from disk (warm), query: the corpus setting on `passages`."""
    path = os.path.join(cache, label + ".jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in passages)
    read, t_read = timed(hotpotqa.jsonl_passages, path)
    folder = os.path.join(cache, "index-" + label)
    _, t_build = timed(hotpotqa.build_corpus_index, folder, read)
    del read
    _, t_load = timed(lambda: hotpotqa.bm25s.BM25.load(folder, mmap=True, show_progress=False))  # arrays only
    index, t_load_corpus = timed(lambda: hotpotqa.bm25s.BM25.load(folder, load_corpus=True, mmap=True,
                                                                  show_progress=False, verbosity=0))
    sample = [passages[i] for i in rng.choice(len(passages), 200, replace=False)]
    titles = [p["title"] for p in sample]
    words = [" ".join(rng.choice(p["text"].rstrip(".").split(), 8, replace=False)) for p in sample]
    first, t_first = timed(hotpotqa.bm25_top, index, titles[0], 5)
    hits = sum(index.corpus[hotpotqa.bm25_top(index, t, 5)[0]]["title"] == t for t in titles)
    arrays = [f for f in os.listdir(folder) if f.endswith(".npy") or f.endswith(".index.json")]
    return dict(paragraphs=len(passages), jsonl_mib=os.path.getsize(path) / 2**20, read_jsonl_s=t_read,
                build_and_save_s=t_build, index_mib=folder_mib(folder, arrays), folder_mib=folder_mib(folder),
                cached_load_s=t_load_corpus, cached_load_arrays_only_s=t_load, first_query_after_load_ms=1e3 * t_first,
                title_query=query_times(index, titles), words8_query=query_times(index, words),
                title_query_top1_is_its_paragraph=hits / len(titles), peak_rss_mib_so_far=peak_rss_mib())


def bench_distractor(paragraph_sets):
    """Per-question 10-document index (built at reset) and a search over it."""
    builds, searches = [], []
    for paras in paragraph_sets:
        index, dt = timed(hotpotqa.bm25_index, ["%s: %s" % (p["title"], p["text"]) for p in paras])
        builds.append(dt)
        searches.append(timed(hotpotqa.bm25_top, index, paras[0]["title"], 5)[1])
    return dict(questions=len(paragraph_sets), index_build_10_paragraphs=stats(builds), search=stats(searches))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,500000", help="synthetic corpus sizes (paragraphs)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    out = dict(machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                            bm25s=hotpotqa.bm25s.__version__, threads=os.environ.get("OMP_NUM_THREADS")))
    with tempfile.TemporaryDirectory() as tmp:
        # the generated sample through the env itself: reset (distractor index) and step (search) times
        sample = os.path.join(tmp, "sample")
        hotpotqa.make_sample(sample)
        for search in ("distractor", "corpus"):
            env, t_make = timed(envs.make, "hotpotqa", data_dir=sample, search=search, cache_dir=os.path.join(tmp, "c"))
            resets, steps, wins = [], [], 0
            for seed in range(len(env)):
                (obs, info), dt = timed(env.reset, seed)
                resets.append(dt)
                done = False
                while not done:
                    (obs, reward, done, info), dt = timed(env.step, info["expert"])
                    steps.append(dt)
                wins += info["won"]
            out["sample_" + search] = dict(questions=len(env), make_s=t_make, reset=stats(resets), step=stats(steps),
                                           expert_wins=wins)
            print(search, out["sample_" + search])
        vocab = ["w%x%s" % (i, "".join(rng.choice(list("aeioukrstlnm"), 3))) for i in range(300_000)]
        out["distractor_wikipedia_sized"] = bench_distractor([synthetic(10, rng, vocab) for _ in range(300)])
        print("distractor", out["distractor_wikipedia_sized"])
        for n in map(int, args.sizes.split(",")):
            passages, t_gen = timed(synthetic, n, rng, vocab)
            out["corpus_%d" % n] = bench_corpus(passages, tmp, str(n), rng)
            out["corpus_%d" % n]["generate_s"] = t_gen
            print(n, out["corpus_%d" % n])
            del passages
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hotpotqa.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump(out, open(path, "w"), indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
