"""Summaries of repeated measurements: a median with its min-max, and percentiles."""

import math
import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples: list[float]) -> Summary:
    if not samples:
        raise ValueError("no samples to summarize")
    return Summary(statistics.median(samples), min(samples), max(samples), len(samples))


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def token_timing(start: float, token_times: list[float]) -> dict:
    """Latency figures of one request from its submission time and each token's arrival."""
    if not token_times:
        raise ValueError("the request produced no tokens")
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    decode_seconds = token_times[-1] - token_times[0]
    return {
        "ttft_s": token_times[0] - start,
        "decode_tok_s": len(gaps) / decode_seconds if decode_seconds > 0 else float("nan"),
        "itl_p50_ms": 1000 * percentile(gaps, 50) if gaps else float("nan"),
        "itl_p99_ms": 1000 * percentile(gaps, 99) if gaps else float("nan"),
    }
