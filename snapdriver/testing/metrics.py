"""Scraping a snapdriver's metrics listener in tests: ``GET /metrics``, parsed into samples."""

from __future__ import annotations

import http.client
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from snapdriver.graphdriver.client import UnixHTTPConnection
from snapdriver.metrics_listen import MetricsAddress


def fetch(address: str, path: str = "/metrics", timeout: float = 10.0) -> tuple[int, str]:
    """The status and body of ``GET path`` at a ``--metrics-listen`` address."""
    where = MetricsAddress.parse(address)
    conn: http.client.HTTPConnection
    if where.path is not None:
        conn = UnixHTTPConnection(str(where.path), timeout)
    else:
        conn = http.client.HTTPConnection(where.host or "127.0.0.1", where.port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@dataclass(frozen=True)
class Samples:
    """One scrape: every sample by name and labels."""

    values: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Samples:
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name, frozenset(sample.labels.items())] = sample.value
        return cls(values)

    def get(self, name: str, **labels: str) -> float:
        """The sample of exactly these labels (0 when absent, as for a series not yet made)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        """All samples of ``name`` whose labels include ``labels``, added up."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and want <= ls)


def scrape(address: str) -> Samples:
    status, body = fetch(address)
    if status != 200:
        raise RuntimeError(f"GET /metrics at {address}: HTTP {status}")
    return Samples.parse(body)
