"""What a benchmark reads off a genserve server's ``/metrics`` around a measured run."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

CPU_LAYOUT_SWITCHES = "genserve_cpu_layout_switches_total"


def cpu_layout_switches(url: str) -> float | None:
    """How often the engine core has switched CPU layouts so far (its tuner's trials and decisions), or
    None where the server exports no such series (a peer, a GPU device, an unreachable server)."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return cpu_layout_switches_in(response.text) if response.status_code == 200 else None


def cpu_layout_switches_in(exposition: str) -> float | None:
    """``genserve_cpu_layout_switches_total`` in a Prometheus text exposition, or None if absent or if the
    text is not an exposition."""
    try:
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name == CPU_LAYOUT_SWITCHES:
                    return sample.value
    except ValueError:
        pass
    return None


def switches_between(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before
