"""``/metrics``: pyoco-server's gauge families (contract §1.9) plus pyoco-es's own, as
Prometheus text.  Values are gathered by the route; this module only renders them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@attrs.frozen(kw_only=True)
class MetricValues:
    runs_by_status: Mapping[str, int]
    runs_today_by_status: Mapping[str, int]
    workers_alive: int | None  # None: the registry could not be read
    dlq_messages: int | None  # None: the stream could not be read (the value line is omitted)
    events_appended: int | None
    projector_lag: int | None
    sse_streams: int
    index_runs: int
    queue_depth: Mapping[str, int] | None = None  # PENDING runs, by tag (what waits for a worker)
    work_items: Mapping[str, int] | None = None  # messages in PYOCO_WORK, by tag (incl. obsolete ones)
    unprojectable_runs: int = 0
    log_lines_dropped: Mapping[str, int] | None = None  # by worker id, from the worker records (live logs)


class _Collector(Collector):
    def __init__(self, values: MetricValues) -> None:
        self.values = values

    def collect(self) -> Iterable[Metric]:
        v = self.values
        runs = GaugeMetricFamily("pyoco_runs_total", "Runs by status (from the gateway's run index).", labels=["status"])
        for status in sorted(v.runs_by_status):
            runs.add_metric([status], v.runs_by_status[status])
        yield runs
        today = GaugeMetricFamily(
            "pyoco_runs_today_total", "Runs by status updated on the server's local calendar day.", labels=["status"]
        )
        for status in sorted(v.runs_today_by_status):
            today.add_metric([status], v.runs_today_by_status[status])
        yield today
        yield _gauge("pyoco_workers_alive_total", "Workers whose effective state is RUNNING or IDLE.", v.workers_alive)
        yield _gauge("pyoco_dlq_messages_total", "Messages in the dead-letter stream.", v.dlq_messages)
        yield _gauge("pyoco_events_appended_total", "Events appended to PYOCO_EVENTS (its last stream sequence).", v.events_appended)
        yield _gauge(
            "pyoco_projector_lag", "Events not yet projected (projector consumer num_pending + ack_pending).", v.projector_lag
        )
        # Runs waiting for a worker.  Not the work stream's message count: a run cancelled or
        # finished while its item still sits in PYOCO_WORK no longer waits for anything (its
        # item is dropped as obsolete when a worker fetches it), so it is not in the queue.
        yield _by_tag("pyoco_queue_depth", "PENDING runs waiting for a worker, by tag.", v.queue_depth)
        yield _by_tag(
            "pyoco_work_stream_messages",
            "Messages in the PYOCO_WORK stream, by tag (including items of runs cancelled meanwhile).",
            v.work_items,
        )
        yield GaugeMetricFamily(
            "pyoco_runs_unprojectable_total",
            "Runs the projector cannot fold (a corrupt or unknown event; see projection_error on the run).",
            value=v.unprojectable_runs,
        )
        dropped = GaugeMetricFamily(
            "pyoco_log_lines_dropped",
            "Task output lines a worker dropped since it started (NATS slow or full, the per-run log limit), by worker.",
            labels=["worker_id"],
        )
        for worker_id in sorted(v.log_lines_dropped or {}):
            dropped.add_metric([worker_id], (v.log_lines_dropped or {})[worker_id])
        yield dropped
        yield GaugeMetricFamily("pyoco_gateway_sse_streams", "SSE streams open on this gateway.", value=v.sse_streams)
        yield GaugeMetricFamily("pyoco_gateway_index_runs", "Runs in this gateway's list read model (SQLite).", value=v.index_runs)


def _by_tag(name: str, help_text: str, values: Mapping[str, int] | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["tag"])
    for tag in sorted(values or {}):
        family.add_metric([tag], (values or {})[tag])
    return family


def _gauge(name: str, help_text: str, value: int | None) -> GaugeMetricFamily:
    """A gauge without labels; its value line is omitted when the value is unknown (None)."""
    family = GaugeMetricFamily(name, help_text)
    if value is not None:
        family.add_metric([], value)
    return family


class HttpMetrics:
    """Requests served by this gateway, by route template (never the raw path: bounded labels)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pyoco_http_requests", "HTTP requests answered, by method, route and status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "pyoco_http_request_duration_seconds", "Time to the response head, by method and route.",
            ["method", "route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


def render(values: MetricValues, http: HttpMetrics | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(values))
    text = generate_latest(registry)
    return text + generate_latest(http.registry) if http is not None else text


def local_day_bounds(now: float) -> tuple[float, float]:
    """[start, end) of the server's local calendar day containing ``now``."""
    lt = time.localtime(now)
    start = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))
    end = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday + 1, 0, 0, 0, 0, 0, -1))
    return start, end
