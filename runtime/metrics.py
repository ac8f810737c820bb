"""`LLM.get_metrics()`: the engine's counters, gauges and latency histograms in the shapes
vLLM's offline API returns (Counter, Gauge, Histogram with cumulative buckets), named
`kiln:…`; and one prometheus_client collector that exposes the same values for every live
engine, for users who scrape them."""

import bisect
import itertools
import weakref
from dataclasses import dataclass, field


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]  # upper bound -> observations at or below it ("+Inf" last)


# Bucket bounds in seconds, as vLLM's.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


@dataclass
class LatencyHistogram:
    bounds: list[float]
    counts: list[int] = field(init=False)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def metric(self, name: str) -> Histogram:
        cumulative = list(itertools.accumulate(self.counts))
        keys = [str(b) for b in self.bounds] + ["+Inf"]
        return Histogram(name, {}, cumulative[-1], self.total, dict(zip(keys, cumulative)))


@dataclass
class EngineStats:
    """What the engine observes as it runs; gauges are read from the engine when asked."""

    ttft: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(TTFT_BUCKETS))
    itl: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(ITL_BUCKETS))
    e2e: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(E2E_BUCKETS))
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests


def collect(engine) -> list[Metric]:
    """The metrics of one engine, now."""
    bm, sched, stats = engine.block_manager, engine.scheduler, engine.stats
    out: list[Metric] = [
        Gauge("kiln:num_requests_running", {}, len(sched.running)),
        Gauge("kiln:num_requests_waiting", {}, len(sched.waiting)),
        Gauge("kiln:kv_cache_usage_perc", {}, 1 - bm.num_free_blocks / bm.num_blocks),
        Counter("kiln:prefix_cache_queries", {}, bm.num_prefix_queries),
        Counter("kiln:prefix_cache_hits", {}, bm.num_prefix_hits),
        Counter("kiln:prompt_tokens", {}, engine.num_prompt_tokens),
        Counter("kiln:generation_tokens", {}, engine.num_generation_tokens),
        Counter("kiln:num_preemptions", {}, sched.num_preemptions),
    ]
    out += [Counter("kiln:request_success", {"finished_reason": reason}, n)
            for reason, n in sorted(stats.finished.items())]
    out += [stats.ttft.metric("kiln:time_to_first_token_seconds"),
            stats.itl.metric("kiln:inter_token_latency_seconds"),
            stats.e2e.metric("kiln:e2e_request_latency_seconds")]
    graphs = engine.runner.graph_runner
    if graphs.backend is not None:
        out += [Gauge("kiln:compile_seconds", {"size": str(size)}, seconds) for size, seconds
                in sorted(graphs.backend.counters.seconds_by_size.items())]
    out += [Counter(f"kiln:{path}_steps", {"size": str(size)}, n)
            for (path, size), n in sorted(graphs.steps.items())]
    return out


_engines: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
_engine_ids = itertools.count()
_registered = False


def expose(engine) -> None:
    """Make `engine`'s metrics visible in prometheus_client's default registry, labelled
    engine="<n>" (one collector serves every engine in the process)."""
    global _registered
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
    except ImportError:
        return
    _engines[str(next(_engine_ids))] = engine
    if _registered:
        return

    class Collector:
        def collect(self):
            families: dict[str, object] = {}
            for engine_id, live in list(_engines.items()):
                for m in collect(live):
                    labels = {**m.labels, "engine": engine_id}
                    if m.name not in families:
                        kind = {Counter: CounterMetricFamily, Gauge: GaugeMetricFamily,
                                Histogram: HistogramMetricFamily}[type(m)]
                        families[m.name] = kind(m.name, m.name, labels=list(labels))
                    family = families[m.name]
                    if isinstance(m, Histogram):
                        family.add_metric(list(labels.values()), list(m.buckets.items()),
                                          m.sum)
                    else:
                        family.add_metric(list(labels.values()), m.value)
            yield from families.values()

    REGISTRY.register(Collector())
    _registered = True
