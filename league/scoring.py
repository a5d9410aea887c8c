"""AlgoPerf's scoring (Dahl et al. 2023; Kasimbeg et al. 2025), as pure functions.

Per workload, a method's time is the median over seeds of its time to reach the target, a seed
that misses (or diverges) counting as infinite (so with 3 seeds, 2 misses make the median infinite).
Under external tuning it is the smallest such median over the method's grid values. Its ratio r is
that time over the fastest method's on the workload. The performance profile is
rho(tau) = share of workloads with r <= tau, and the score is the integral of rho from 1 to 4
divided by 3, computed exactly as the mean over workloads of (4 - min(r, 4)) / 3 (0 where r is
infinite). A workload every method misses has no fastest time: every ratio there is infinite, so
it adds 0 to every score (it still counts in the mean). A method that does not run on a workload
(the learned optimizers off their family) counts as missing it. Ties get the same ratio.
"""

from __future__ import annotations

import math
import statistics

INF = math.inf
TAU_MAX = 4.0


def median_time(times) -> float:
    """The median over seeds of a method's times (None or a non-finite time = a miss = infinite)."""
    values = [INF if t is None or not math.isfinite(t) else float(t) for t in times]
    if not values:
        raise ValueError("times: no seeds")
    return statistics.median(values)  # an odd seed count: one of the values, inf included


def method_times(runs: list[dict], key: str = "steps_to_target") -> dict[str, dict[str, float]]:
    """time[method][workload]: the median over seeds per grid value, then the best grid value.

    `runs`: records with "method", "workload", "seed", "grid" and `key` (None for a miss), all of one ruleset."""
    by_point: dict[tuple, list] = {}
    for r in runs:
        by_point.setdefault((r["method"], r["workload"], r["grid"]), []).append(r[key])
    times: dict[str, dict[str, float]] = {}
    for (m, w, _), values in by_point.items():
        t = median_time(values)
        times.setdefault(m, {})[w] = min(t, times.get(m, {}).get(w, INF))
    return times


def ratios(times: dict[str, dict[str, float]], workloads) -> dict[str, dict[str, float]]:
    """r[method][workload] = time / the fastest time there (inf for a miss, or where every method misses)."""
    out = {m: {} for m in times}
    for w in workloads:
        best = min((times[m].get(w, INF) for m in times), default=INF)
        for m in times:
            t = times[m].get(w, INF)
            if not (math.isfinite(best) and math.isfinite(t)):
                out[m][w] = INF
            else:  # a time of 0 (a target met at the start) ties with the fastest
                out[m][w] = 1.0 if t == best else t / best if best > 0 else INF
    return out


def profile(ratios_of_method: dict[str, float], workloads, tau: float) -> float:
    """rho(tau): the share of the workloads where the method's ratio is <= tau."""
    workloads = list(workloads)
    return sum(ratios_of_method.get(w, INF) <= tau for w in workloads) / len(workloads)


def score(ratios_of_method: dict[str, float], workloads) -> float:
    """The integral of rho from 1 to TAU_MAX over (TAU_MAX - 1): mean of (TAU_MAX - min(r, TAU_MAX)) / (TAU_MAX - 1)."""
    workloads = list(workloads)
    if not workloads:
        raise ValueError("workloads: none to score")
    parts = [(TAU_MAX - min(ratios_of_method.get(w, INF), TAU_MAX)) / (TAU_MAX - 1) for w in workloads]
    return sum(parts) / len(parts)


def scores(runs: list[dict], workloads, methods, key: str = "steps_to_target") -> dict[str, float]:
    """score[method] over `workloads` of one ruleset's runs (methods with no run score 0)."""
    times = method_times(runs, key)
    for m in methods:
        times.setdefault(m, {})
    r = ratios(times, workloads)
    return {m: score(r[m], workloads) for m in methods}
