"""Prometheus metrics: counters, gauges and histograms, rendered in the text format.

Hand-rolled rather than prometheus_client because the DNS hot path must not take a lock or
allocate per query: the resolver counts hits on its memoized replies and folds them into
these counters only when /metrics is scraped (see ``Metrics.on_collect``). Everything
runs on the node's one event loop, so plain dicts are safe. The node's HTTP server
(``node/api.py``) serves the rendered text.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        lines += [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class Gauge(_Metric):
    """A value read when scraped: ``read()`` returns {label values: value}."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], dict[tuple[str, ...], float] | float],
                 labels: Sequence[str] = (), kind: str = "gauge") -> None:
        super().__init__(name, help_text, labels)
        self.read = read
        self.kind = kind  # "counter" for a total that something else keeps

    def render(self) -> list[str]:
        values = self.read()
        if not isinstance(values, dict):
            values = {(): values}
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, *labels: str) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                series[index] += 1
        series[-2] += value
        series[-1] += 1

    def render(self) -> list[str]:
        lines = self.header()
        for key, series in sorted(self.series.items()):
            bounds = [*(_number(b) for b in self.buckets), "+Inf"]
            counts = [*series[:-2], series[-1]]
            for bound, count in zip(bounds, counts, strict=True):
                le = 'le="' + bound + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_number(count)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(series[-1])}")
        return lines


class Metrics:
    """The set of metrics one process exposes."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, read, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, read, labels))  # type: ignore[return-value]

    def counter_from(self, name: str, help_text: str, read, labels: Sequence[str] = ()) -> Gauge:
        """A counter whose total is kept elsewhere and read when scraped."""
        return self._add(Gauge(name, help_text, read, labels, kind="counter"))  # type: ignore[return-value]

    def histogram(self, name: str, help_text: str, labels: Sequence[str] = (), buckets=LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help_text, labels, buckets))  # type: ignore[return-value]

    def on_collect(self, collector: Callable[[], None]) -> None:
        """Run ``collector`` before every render (to fold counts kept elsewhere)."""
        self._collectors.append(collector)

    def render(self) -> str:
        for collector in self._collectors:
            collector()
        lines: list[str] = []
        for metric in self._metrics.values():
            lines += metric.render()
        return "\n".join(lines) + "\n"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {text!r} must look like 127.0.0.1:9253")
    return host.strip("[]") or "127.0.0.1", int(port)
