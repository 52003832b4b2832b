"""Prometheus metrics for the whole relay, kept in Redis so that every web process and every
worker adds to the same counters, and any web process can answer a scrape of ``/metrics``.

Counters are fields of one hash (``HINCRBY``), written at job-lifecycle events — never per
viewer and, for deltas, once per job — so they cost a few Redis commands per job. A worker
gathers a job's own counters in a :class:`Tally` and writes them in one round trip after its
first chunk and one at its end: each write cost the worker ~0.3 ms of CPU, and written as they
happened, on the way to the first token (tests/bench/RESULTS.md).
"""

from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from relay.core import keys, queue
from relay.core.connections import Client, as_text
from relay.core.status import TERMINAL

FIRST_CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Tally:
    """Counter changes kept in memory until :meth:`flush` writes them, in one round trip.
    Every function here that takes ``redis`` takes a tally as well (or a pipeline)."""

    __slots__ = ("_ints", "_floats")

    def __init__(self) -> None:
        self._ints: Counter[tuple[str, str]] = Counter()
        self._floats: defaultdict[tuple[str, str], float] = defaultdict(float)

    def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        self._ints[key, field] += amount

    def hincrbyfloat(self, key: str, field: str, amount: float) -> None:
        self._floats[key, field] += amount

    def write(self, pipe: Any) -> None:
        """Queue what was counted since the last write in ``pipe``, and start afresh."""
        ints, floats = self._ints, self._floats
        self._ints, self._floats = Counter(), defaultdict(float)
        for (key, field), amount in ints.items():
            pipe.hincrby(key, field, amount)
        for (key, field), value in floats.items():
            pipe.hincrbyfloat(key, field, value)

    def flush(self, redis: Client) -> None:
        """Write what was counted since the last flush (nothing is kept if Redis fails)."""
        if self._ints or self._floats:
            pipe = redis.pipeline(transaction=False)
            self.write(pipe)
            pipe.execute()


def count(redis: Any, name: str, amount: int = 1) -> None:
    """Add to a counter (``redis`` may be a pipeline or a :class:`Tally`)."""
    if amount:
        redis.hincrby(keys.METRICS, name, amount)


def job_finished(redis: Any, outcome: str) -> None:
    count(redis, f"jobs_finished:{outcome}")


# The relay's own error codes; any other (an upstream's own, which it may make up freely)
# counts as "upstream_other", so that /metrics keeps a bounded set of label values.
RELAY_ERROR_CODES = frozenset(
    ("upstream_timeout", "upstream_unreachable", "upstream_disconnected", "upstream_incomplete",
     "upstream_malformed", "moderation_unavailable", "internal_error", "worker_lost", "job_lost")
)  # fmt: skip
_HTTP_CODE = re.compile(r"upstream_http_[1-5][0-9][0-9]")


def upstream_error(redis: Any, code: str | None) -> None:
    """Count a job failed by an upstream error, under a label from a bounded set."""
    known = code in RELAY_ERROR_CODES or (code is not None and _HTTP_CODE.fullmatch(code))
    count(redis, f"upstream_errors:{code if known else 'upstream_other'}")


def failure_class(status: int | None, code: str | None) -> str:
    """An upstream failure's class, for per-upstream counters: a bounded set."""
    if status is not None:
        return "http_429" if status == 429 else f"http_{status // 100}xx"
    if code in ("upstream_timeout", "upstream_unreachable", "upstream_disconnected",
                "upstream_incomplete", "upstream_malformed"):  # fmt: skip
        return code.removeprefix("upstream_")
    return "other"


def upstream_request(redis: Any, upstream: str) -> None:
    count(redis, f"upstream_requests:{upstream}")


def upstream_failure(redis: Any, upstream: str, status: int | None, code: str | None) -> None:
    count(redis, f"upstream_failures:{upstream}:{failure_class(status, code)}")


def upstream_fallback(redis: Any, upstream: str) -> None:
    """A job moved away from ``upstream`` to the next of its route."""
    count(redis, f"upstream_fallbacks:{upstream}")


def upstream_first_token(tally: Tally | Any, upstream: str, seconds: float) -> None:
    """The time from sending a job to ``upstream`` to its first chunk (into a tally or a
    pipeline: two commands)."""
    tally.hincrby(keys.METRICS, f"upstream_ttft_count:{upstream}", 1)
    tally.hincrbyfloat(keys.METRICS, f"upstream_ttft_sum:{upstream}", seconds)


def observe_first_chunk(tally: Tally | Any, seconds: float) -> None:
    """One sample of the time from enqueue to the first relayed chunk (into a tally or a
    pipeline: two commands)."""
    index = bisect.bisect_left(FIRST_CHUNK_BUCKETS, seconds)
    bucket = str(FIRST_CHUNK_BUCKETS[index]) if index < len(FIRST_CHUNK_BUCKETS) else "+Inf"
    tally.hincrby(keys.METRICS, f"first_chunk_bucket:{bucket}", 1)
    tally.hincrbyfloat(keys.METRICS, "first_chunk_sum", seconds)


class RelayCollector(Collector):
    """Reads the shared counters and the queue's state at scrape time."""

    def __init__(self, redis: Client) -> None:
        self.redis = redis

    def collect(self) -> Iterator[Metric]:
        raw = self.redis.hgetall(keys.METRICS)
        fields = {as_text(k): as_text(v) for k, v in raw.items()}

        def number(name: str) -> float:
            return float(fields.get(name, 0))

        yield _counter("relay_jobs_created", "Jobs accepted.", number("jobs_created"))
        yield GaugeMetricFamily(
            "relay_jobs_queued", "Jobs waiting for a worker.", value=queue.pending_count(self.redis)
        )
        workers = queue.live_workers(self.redis)
        running = sum(queue.claimed_count(self.redis, w) for w in workers)
        yield GaugeMetricFamily(
            "relay_jobs_running", "Jobs claimed by live workers.", value=running
        )
        yield GaugeMetricFamily(
            "relay_workers", "Workers with a live heartbeat.", value=len(workers)
        )
        finished = CounterMetricFamily(
            "relay_jobs_finished", "Jobs ended, by outcome.", labels=["outcome"]
        )
        for outcome in TERMINAL:
            finished.add_metric([outcome], number(f"jobs_finished:{outcome}"))
        yield finished
        yield GaugeMetricFamily(
            "relay_viewers", "Viewers attached to jobs, across all web processes.",
            value=number("viewers"),
        )  # fmt: skip
        yield _counter("relay_deltas_relayed", "Content deltas relayed.", number("deltas"))
        yield _counter(
            "relay_deltas_coalesced",
            "Content deltas merged into the event before them because a worker was behind.",
            number("deltas_coalesced"),
        )
        errors = CounterMetricFamily(
            "relay_upstream_errors", "Jobs failed by an upstream error, by code.", labels=["code"]
        )
        for name, value in sorted(fields.items()):
            if name.startswith("upstream_errors:"):
                errors.add_metric([name.split(":", 1)[1]], float(value))
        yield errors
        yield from self._per_upstream(fields)
        yield self._first_chunk(number)

    def _per_upstream(self, fields: dict[str, str]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "relay_upstream_requests", "Requests sent to each upstream.", labels=["upstream"]
        )
        failures = CounterMetricFamily(
            "relay_upstream_failures", "Failed upstream requests, by upstream and class.",
            labels=["upstream", "class"],
        )  # fmt: skip
        fallbacks = CounterMetricFamily(
            "relay_upstream_fallbacks",
            "Jobs moved from an upstream to the next of their route before the first chunk.",
            labels=["upstream"],
        )
        ttft = SummaryMetricFamily(
            "relay_upstream_time_to_first_token_seconds",
            "Time from sending a job to an upstream to its first chunk.",
            labels=["upstream"],
        )
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for name, value in sorted(fields.items()):
            kind, _, rest = name.partition(":")
            if kind == "upstream_requests":
                requests.add_metric([rest], float(value))
            elif kind == "upstream_failures":
                upstream, _, klass = rest.rpartition(":")
                failures.add_metric([upstream, klass], float(value))
            elif kind == "upstream_fallbacks":
                fallbacks.add_metric([rest], float(value))
            elif kind == "upstream_ttft_sum":
                sums[rest] = float(value)
            elif kind == "upstream_ttft_count":
                counts[rest] = float(value)
        for upstream in sorted(counts):
            ttft.add_metric([upstream], count_value=int(counts[upstream]),
                            sum_value=sums.get(upstream, 0.0))  # fmt: skip
        yield from (requests, failures, fallbacks, ttft)

    def _first_chunk(self, number: Any) -> Metric:
        cumulative, buckets = 0.0, []
        for bound in (*FIRST_CHUNK_BUCKETS, "+Inf"):
            cumulative += number(f"first_chunk_bucket:{bound}")
            buckets.append(("+Inf" if bound == "+Inf" else str(bound), cumulative))
        return HistogramMetricFamily(
            "relay_enqueue_to_first_chunk_seconds",
            "Time from a job's creation to its first relayed chunk.",
            buckets=buckets,
            sum_value=number("first_chunk_sum"),
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def registry(redis: Client) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RelayCollector(redis))
    return reg
