"""Prometheus text exposition (format 0.0.4), written here to keep the runtime dependency-free.

Only what the webhook needs: counters and gauges with fixed label names, and a histogram with
buckets that resolve milliseconds. Updates are plain dict/list increments: the server runs one
event loop, and the event worker thread only touches its own counters (the GIL keeps a single
``+=`` on a dict entry consistent enough for monitoring).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import TypeVar

#: Admission latency buckets (seconds): sub-millisecond to a second, dense where webhooks live.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> Iterable[str]:  # pragma: no cover - abstract
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def samples(self) -> Iterable[str]:
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labelnames, labels)} {_number(value)}"


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def clear(self) -> None:
        self.values.clear()


class Histogram(_Metric):
    """A label-less histogram; bucket counts are stored per bucket and cumulated on render."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text)
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above the largest bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> Iterable[str]:
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            yield f'{self.name}_bucket{{le="{_number(bound)}"}} {running}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{self.name}_sum {_number(self.sum)}"
        yield f"{self.name}_count {self.count}"


M = TypeVar("M", bound=_Metric)


class Registry:
    """The set of metrics one server exposes."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines.extend(metric.header())
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"


class InjectorMetrics:
    """Every metric the webhook server exports, by name."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(
            Counter(
                "mesh_injector_requests_total",
                "HTTP requests by endpoint and status code.",
                ("endpoint", "code"),
            )
        )
        self.injections = r.add(
            Counter(
                "mesh_injector_injections_total",
                "Admission reviews answered with an injection, by reason code.",
                ("reason",),
            )
        )
        self.skips = r.add(
            Counter(
                "mesh_injector_skips_total",
                "Admission reviews for pods left alone, by reason code.",
                ("reason",),
            )
        )
        self.rejections = r.add(
            Counter(
                "mesh_injector_rejections_total",
                "Admission reviews refused (allowed: false), by reason code.",
                ("reason",),
            )
        )
        self.passthrough = r.add(
            Counter(
                "mesh_injector_passthrough_total",
                "Admission reviews allowed untouched because they are not pod CREATEs, by reason.",
                ("reason",),
            )
        )
        self.warnings = r.add(
            Counter(
                "mesh_injector_warnings_total",
                "Warnings returned with admission responses, by reason code.",
                ("reason",),
            )
        )
        self.latency = r.add(
            Histogram(
                "mesh_injector_admission_duration_seconds",
                "Time from a complete request body to the encoded admission response.",
            )
        )
        self.config_reloads = r.add(
            Counter(
                "mesh_injector_config_reloads_total",
                "Configuration directory reloads by result (success or failure).",
                ("result",),
            )
        )
        self.config_last_reload_success = r.add(
            Gauge(
                "mesh_injector_config_last_reload_success",
                "1 when the last configuration load succeeded, 0 when it failed and the old config runs.",
            )
        )
        self.config_info = r.add(
            Gauge(
                "mesh_injector_config_info",
                "The configuration in use (value always 1), labelled by its hash.",
                ("config_hash",),
            )
        )
        self.cert_expiry = r.add(
            Gauge(
                "mesh_injector_tls_certificate_expiry_timestamp_seconds",
                "Unix time at which the serving certificate in use expires.",
            )
        )
        self.cert_reloads = r.add(
            Counter(
                "mesh_injector_tls_certificate_reloads_total",
                "Serving certificate reloads by result (success or failure).",
                ("result",),
            )
        )
        self.events = r.add(
            Counter(
                "mesh_injector_events_total",
                "Kubernetes Events by outcome (sent, failed, dropped when the queue was full).",
                ("result",),
            )
        )

    def render(self) -> str:
        return self.registry.render()
