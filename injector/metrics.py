"""The webhook's metrics, served by ``prometheus_client`` (text 0.0.4 or OpenMetrics, negotiated).

Our own names (``mesh_injector_*``) and, beside them, Istio's sidecar-injector counters
(``sidecar_injection_{requests,success,skip,failure}_total``; Istio defines them without labels,
and so do we) so dashboards and alerts written for istiod keep working.

With several uvicorn workers, each worker counts in its own process and ``/metrics`` must show
the sum: ``serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before anything imports
``prometheus_client``, values then live in per-process mmap files, and ``render`` aggregates
them (counters and histograms summed; gauges by the mode that fits each one). Without that
variable (tests, one process) the same classes count in memory.

Each metric is wrapped in a small adapter keeping the call shape the endpoints use
(``requests.inc("inject", "200")``). The admission path's metrics are *batched*: an update is a
dict increment on the event loop thread, and ``flush()`` (every half second, before every scrape
and at shutdown) hands the totals to prometheus_client. Measured per review, its multiprocess
values cost ~20-40 us (a lock and an mmap write per series, three for a histogram observation)
against ~0.4 ms for the whole review; batched it is ~2 us. Metrics updated from other threads
(Events) are not batched.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import exposition as _exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

#: Admission latency buckets (seconds): sub-millisecond to a second, dense where webhooks live.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# ``*_created`` series double every counter's output and no dashboard of ours reads them.
disable_created_metrics()


def multiprocess_dir() -> str | None:
    """The directory the workers share their values in, or None when counting in memory."""
    return os.environ.get(MULTIPROC_ENV) or None


def enable_multiprocess(directory: str) -> None:
    """Count in ``directory``'s shared files from now on (before any metric is created).

    prometheus_client picks its value class when first imported; it is picked again here so
    the order of imports does not matter.
    """
    os.environ[MULTIPROC_ENV] = directory
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


class _Labelled:
    """A labelled metric with its children cached by label values."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def child(self, labels: tuple[str, ...]) -> Any:
        found = self._children.get(labels)
        if found is None:
            found = self.metric.labels(*labels) if labels else self.metric
            self._children[labels] = found
        return found


class CounterVec(_Labelled):
    def __init__(self, metric: Any, batched: bool = False) -> None:
        super().__init__(metric)
        self.pending: dict[tuple[str, ...], float] | None = {} if batched else None

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        pending = self.pending
        if pending is None:
            self.child(labels).inc(amount)
        else:
            pending[labels] = pending.get(labels, 0.0) + amount

    def flush(self) -> None:
        if self.pending:
            items, self.pending = self.pending, {}
            for labels, amount in items.items():
                self.child(labels).inc(amount)

    def get(self, *labels: str) -> float:
        """This process's value (tests and the bench read it; /metrics shows the sum)."""
        self.flush()
        return float(self.child(labels)._value.get())


class GaugeVec(CounterVec):
    def set(self, value: float, *labels: str) -> None:
        self.child(labels).set(value)


class HistogramVec(_Labelled):
    """A label-less histogram whose observations are counted per bucket until ``flush``."""

    def __init__(self, metric: Any, bounds: Sequence[float]) -> None:
        super().__init__(metric)
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # buckets are "<= bound"
        self.total += value

    def flush(self) -> None:
        if not any(self.counts):
            return
        counts, total = self.counts, self.total
        self.counts, self.total = [0] * len(counts), 0.0
        histogram = self.metric
        # prometheus_client keeps one (non-cumulative) value per bucket and one for the sum;
        # adding to them is what ``observe`` does, once per observation.
        for bucket, n in zip(histogram._buckets, counts, strict=True):
            if n:
                bucket.inc(n)
        histogram._sum.inc(total)


class _WorkerProcesses:
    """``process_*`` metrics for the whole server: the sum over its live worker processes.

    prometheus_client's process collector reads one pid; in multiprocess mode the scrape lands
    on any worker, so the workers' pids (the names of their value files) are read instead.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _pids(self) -> list[int]:
        pids = {os.getpid()}
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []
        for name in names:
            stem = name.rsplit(".", 1)[0]
            tail = stem.rsplit("_", 1)[-1]
            if tail.isascii() and tail.isdigit() and os.path.exists(f"/proc/{tail}/stat"):
                pids.add(int(tail))
        return sorted(pids)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, float] = {}
        for pid in self._pids():
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                value = sum(sample.value for sample in family.samples)
                if family.name not in families:
                    families[family.name], values[family.name] = family, value
                elif family.name.endswith(("start_time_seconds", "max_fds")):
                    values[family.name] = min(values[family.name], value)  # the oldest; the limit
                else:
                    values[family.name] += value
        for name, family in families.items():
            kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
            yield kind(name, family.documentation + " (sum over the worker processes)", value=values[name])


class InjectorMetrics:
    """Every metric the webhook server exports, by name."""

    CONTENT_TYPE = _exposition.CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        directory = multiprocess_dir()
        self.multiprocess = directory is not None
        # In multiprocess mode the values go to the shared files whatever the registry; the
        # private registry keeps several instances in one process (tests) from colliding.
        r = self.registry = CollectorRegistry(auto_describe=False)

        def counter(name: str, doc: str, labels: Sequence[str] = (), batched: bool = True) -> CounterVec:
            return CounterVec(Counter(name, doc, labels, registry=r), batched)

        def gauge(name: str, doc: str, mode: str, labels: Sequence[str] = ()) -> GaugeVec:
            return GaugeVec(Gauge(name, doc, labels, registry=r, multiprocess_mode=mode))

        self.requests = counter("mesh_injector_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "code"))
        self.injections = counter("mesh_injector_injections_total",
                                  "Admission reviews answered with an injection, by reason code.",
                                  ("reason",))
        self.skips = counter("mesh_injector_skips_total",
                             "Admission reviews for pods left alone, by reason code.", ("reason",))
        self.rejections = counter("mesh_injector_rejections_total",
                                  "Admission reviews refused (allowed: false), by reason code.", ("reason",))
        self.passthrough = counter(
            "mesh_injector_passthrough_total",
            "Admission reviews allowed untouched because they are not pod CREATEs, by reason.", ("reason",))
        self.warnings = counter("mesh_injector_warnings_total",
                                "Warnings returned with admission responses, by reason code.", ("reason",))
        self.latency = HistogramVec(Histogram(
            "mesh_injector_admission_duration_seconds",
            "Time from a complete request body to the encoded admission response.",
            buckets=LATENCY_BUCKETS, registry=r,
        ), LATENCY_BUCKETS)
        self.config_reloads = counter("mesh_injector_config_reloads_total",  # on the reload thread
                                      "Configuration directory reloads by result (success or failure).",
                                      ("result",), batched=False)
        self.config_last_reload_success = gauge(
            "mesh_injector_config_last_reload_success",
            "1 when the last configuration load succeeded, 0 when it failed and the old config runs "
            "(the lowest over the workers).", "livemin")
        self.config_info = gauge(
            "mesh_injector_config_info",
            "1 for each configuration hash some worker serves (0: served before a reload).",
            "livemax", ("config_hash",))
        self.cert_expiry = gauge(
            "mesh_injector_tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the serving certificate in use expires.", "livemostrecent")
        self.cert_reloads = counter("mesh_injector_tls_certificate_reloads_total",
                                    "Serving certificate reloads by result (success or failure).",
                                    ("result",), batched=False)
        self.events = counter("mesh_injector_events_total",  # counted on the Events thread
                              "Kubernetes Events by outcome (sent, failed, dropped when the queue was full).",
                              ("result",), batched=False)
        self.answer_memo = counter(
            "mesh_injector_answer_memo_total",
            "Pod CREATE reviews by whether the answer was remembered (hit: a replica of a pod already "
            "answered under the same config and namespace) or computed by the core (miss).",
            ("result",))
        self.timeouts = counter("mesh_injector_admission_timeouts_total",
                                "Admission reviews answered Timeout because the request deadline passed.")
        self.refused_connections = counter(
            "mesh_injector_http_refused_total",
            "Requests or connections refused by an HTTP limit, by limit.", ("limit",))
        # Istio's names, beside ours (istiod's pkg/kube/inject defines them without labels).
        self.istio_requests = counter("sidecar_injection_requests_total",
                                      "Total number of sidecar injection requests.")
        self.istio_success = counter("sidecar_injection_success_total",
                                     "Total number of successful sidecar injection requests.")
        self.istio_skip = counter("sidecar_injection_skip_total",
                                  "Total number of skipped sidecar injection requests.")
        self.istio_failure = counter("sidecar_injection_failure_total",
                                     "Total number of failed sidecar injection requests.")
        # Materialize the label-less series so a scrape shows them at 0 from the start.
        for metric in (self.istio_requests, self.istio_success, self.istio_skip, self.istio_failure,
                       self.timeouts):
            metric.child(())

        self.batched = [m for m in vars(self).values()
                        if isinstance(m, HistogramVec) or getattr(m, "pending", None) is not None]

    def flush(self) -> None:
        """Hand the batched updates to prometheus_client (call on the thread that updates them)."""
        for metric in self.batched:
            metric.flush()

    def _collectors(self) -> Iterable[Any]:
        directory = multiprocess_dir()
        if self.multiprocess and directory:
            from prometheus_client import multiprocess

            registry = CollectorRegistry(auto_describe=False)
            multiprocess.MultiProcessCollector(registry, path=directory)
            registry.register(_WorkerProcesses(directory))
            return registry
        registry = self.registry
        if not getattr(self, "_process_registered", False):
            registry.register(ProcessCollector(registry=None))
            self._process_registered = True
        return registry

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) for a scrape with this ``Accept`` header (``flush`` first)."""
        encoder, content_type = _exposition.choose_encoder(accept or "")
        return encoder(self._collectors()), content_type

    def render(self) -> str:
        """The text format (0.0.4), this process's batched updates included."""
        self.flush()
        return _exposition.generate_latest(self._collectors()).decode()


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters stay in the sums)."""
    directory = multiprocess_dir()
    if directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)
