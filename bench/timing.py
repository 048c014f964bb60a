"""How the benchmark scripts time a call: the fastest of a few, after untimed ones (a machine's noise, a cold cache,
a first call's allocations and compilations only ever add time).

    seconds, out = best_of(lambda: model(x), reps=5, warmup=2)
"""
import time


def best_of(fn, reps: int, warmup: int = 0, budget_s: float = float("inf")) -> tuple[float, object]:
    """(the fastest of `reps` timed calls of `fn` in seconds, the last call's result), after `warmup` untimed calls.
    Fewer calls once they have taken `budget_s` in all (at least one untimed call, if `warmup`, and one timed):
    a product with no instructions of its own on this CPU (bf16 without AVX-512 BF16 or AMX) can take minutes."""
    start = time.perf_counter()
    for i in range(warmup):
        if i and time.perf_counter() - start > budget_s:
            break
        fn()
    best, out = float("inf"), None
    for i in range(reps):
        if i and time.perf_counter() - start > budget_s:
            break
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
