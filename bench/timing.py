"""How the benchmark scripts time a call: the fastest of a few, after untimed ones (a machine's noise, a cold cache,
a first call's allocations and compilations only ever add time).

    seconds, out = best_of(lambda: model(x), reps=5, warmup=2)
"""
import time


def best_of(fn, reps: int, warmup: int = 0) -> tuple[float, object]:
    """(the fastest of `reps` timed calls of `fn` in seconds, the last call's result), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
