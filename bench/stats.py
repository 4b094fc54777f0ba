"""Aggregation of cell results across rounds: req/s, percentiles, ratios (pure)."""
from __future__ import annotations

from dataclasses import dataclass, field


def pct(sorted_vals: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


@dataclass
class Agg:
    """Everything measured for one (target, workload, concurrency), all rounds merged."""
    n: int = 0
    in_window: int = 0
    errors: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    lat: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    round_rps: list[float] = field(default_factory=list)
    sample_error: str | None = None

    def add(self, r) -> None:
        self.n += r.n
        self.in_window += r.in_window
        self.errors += r.errors
        self.wall += r.wall
        self.cpu += r.cpu
        self.lat.extend(r.lat)
        self.first.extend(r.first)
        self.round_rps.append(r.in_window / r.wall if r.wall else 0.0)
        self.sample_error = self.sample_error or r.sample_error

    def summary(self) -> dict:
        lat = sorted(self.lat)
        first = sorted(self.first)
        ms = lambda v: None if v is None else v * 1000  # noqa: E731
        return {
            "n": self.n, "errors": self.errors,
            "rps": self.in_window / self.wall if self.wall else 0.0,
            "rps_min": min(self.round_rps) if self.round_rps else 0.0,
            "rps_max": max(self.round_rps) if self.round_rps else 0.0,
            "p50": ms(pct(lat, 50)), "p95": ms(pct(lat, 95)), "p99": ms(pct(lat, 99)),
            "first_p50": ms(pct(first, 50)), "first_p95": ms(pct(first, 95)), "first_p99": ms(pct(first, 99)),
            "client_cpu_us": (self.cpu / self.n * 1e6) if self.n else None,
            "client_cpu_share": (self.cpu / self.wall) if self.wall else None,
            "sample_error": self.sample_error,
        }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a - b
