"""WebShop env speed (envs/webshop.py): the search index build (cold) and its cached load, search, reset and step
times, and the expert's wins, on generated catalogues of the official schema: the sample (`--make-sample`'s 270
products) and one of ~1,000 products (the size of the official 1000-product setting; its texts are shorter than
the real scrape's). Writes bench/results/webshop.json.

    python bench/bench_webshop.py          # ~1 minute on 2 CPU cores
"""
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs import hotpotqa, webshop  # noqa: E402


def stats(xs):
    return dict(n=len(xs), mean_ms=round(1e3 * statistics.mean(xs), 3), median_ms=round(1e3 * statistics.median(xs), 3),
                max_ms=round(1e3 * max(xs), 3))


def bench(per_type):
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = os.path.join(tmp, "data"), os.path.join(tmp, "cache")
        t = time.perf_counter()
        sizes = webshop.make_sample(data, per_type=per_type)
        made = time.perf_counter() - t
        t = time.perf_counter()
        env = webshop.WebShopEnv("train", data_dir=data, cache_dir=cache)  # parse, goals, index build
        cold = time.perf_counter() - t
        hotpotqa._INDEXES.clear()
        webshop._CATALOGUES.clear()
        t = time.perf_counter()
        webshop.WebShopEnv("train", data_dir=data, cache_dir=cache)  # a new process: parse, goals, index from disk
        warm = time.perf_counter() - t
        t = time.perf_counter()
        webshop.WebShopEnv("eval", data_dir=data, cache_dir=cache)  # every further env of the process
        shared = time.perf_counter() - t
        searches = []
        for p in env.products[:200]:
            t = time.perf_counter()
            env.search(p["Title"].lower())
            searches.append(time.perf_counter() - t)
        resets, steps, wins, lengths = [], {}, 0, []
        for s in range(len(env)):
            t = time.perf_counter()
            obs, info = env.reset(s)
            resets.append(time.perf_counter() - t)
            done = False
            while not done:
                kind = info["expert"].split("[")[0].replace("<action>", "")
                page = env.page
                t = time.perf_counter()
                obs, r, done, info = env.step(info["expert"])
                steps.setdefault("%s on %s page" % (kind, page), []).append(time.perf_counter() - t)
                lengths.append(len(obs))
            wins += info["won"]
        return dict(catalogue=sizes, make_sample_s=round(made, 3), first_env_s=round(cold, 3),
                    new_process_env_s=round(warm, 3), further_env_s=round(shared, 4), search=stats(searches),
                    reset=stats(resets), step={k: stats(v) for k, v in sorted(steps.items())},
                    expert_wins=dict(wins=wins, goals=len(env)), observation_chars=dict(
                        mean=round(statistics.mean(lengths)), max=max(lengths)))


def main():
    import bm25s
    import thefuzz
    out = dict(date=time.strftime("%Y-%m-%d"), machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                                                             python=platform.python_version(), processor=platform.processor()),
               versions=dict(bm25s=bm25s.__version__, thefuzz=thefuzz.__version__))
    for label, per_type in (("sample_270", 9), ("catalogue_1020", 34)):
        out[label] = bench(per_type)
        print(label, json.dumps(out[label], indent=1))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "webshop.json")
    json.dump(out, open(path, "w"), indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
