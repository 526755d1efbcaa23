"""Energy and CO2: measured with codecarbon's offline tracker, or estimated and labelled so.

Why offline only: codecarbon's default ``EmissionsTracker`` calls geo-IP services and the
cloud metadata address, then silently assumes a country. ``OfflineEmissionsTracker`` with
the configured country sends nothing anywhere. On machines without RAPL (this one, most
VMs) codecarbon models CPU power from a TDP guess times CPU load and RAM power from its
size, so its figures are "estimated by codecarbon from CPU/GPU power models", and every
figure here carries a method string saying which kind it is. Grid intensities come from
the energy-mix table that ships inside codecarbon (Our World in Data, per country).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("distill.carbon")

MEASURED = "estimated by codecarbon from CPU/GPU power models (OfflineEmissionsTracker, {mode} mode, {country})"


@cache
def _energy_mix() -> dict[str, Any]:
    import codecarbon

    p = Path(codecarbon.__file__).parent / "data" / "private_infra" / "global_energy_mix.json"
    return json.loads(p.read_text())


def grid_intensity(country_iso_code: str) -> float:
    """gCO2e per kWh of a country's grid, from codecarbon's bundled energy-mix data."""
    mix = _energy_mix()
    if country_iso_code not in mix:
        raise ValueError(f"energy: unknown country_iso_code {country_iso_code!r} (codecarbon has no grid data for it)")
    return float(mix[country_iso_code]["carbon_intensity"])


@dataclass
class EnergyReading:
    """Energy of one measured stretch of work; ``kwh`` is None when it could not be measured."""

    label: str
    kwh: Optional[float] = None
    gco2: Optional[float] = None
    duration_s: float = 0.0
    method: str = "not measured"
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_kwh": self.kwh,
            f"{prefix}_gco2": self.gco2,
            f"{prefix}_energy_s": round(self.duration_s, 2),
            f"{prefix}_kwh_method": self.method,
            f"{prefix}_gco2_method": self.method,
        }


@contextlib.contextmanager
def measure_energy(
    label: str,
    country_iso_code: str,
    *,
    enabled: bool = True,
    cpu_power_w: Optional[float] = None,
    measure_power_secs: float = 5.0,
    tracking_mode: str = "machine",
) -> Iterator[EnergyReading]:
    """Measure the energy of the ``with`` block; the reading is filled in when the block ends.

    ``machine`` mode counts the whole machine's CPU load, which is what a local teacher
    serving from a subprocess needs; anything else running at the same time is counted too.
    A tracker that fails to start or stop never fails the run: the reading then says why.
    """
    reading = EnergyReading(label)
    tracker = None
    t0 = time.monotonic()
    if enabled:
        try:
            from codecarbon import OfflineEmissionsTracker

            logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its init chatter comes before log_level applies

            kw: dict[str, Any] = {
                "country_iso_code": country_iso_code,
                "log_level": "error",
                "output_methods": [],
                "measure_power_secs": measure_power_secs,
                "tracking_mode": tracking_mode,
                "project_name": f"distill-{label}",
                "allow_multiple_runs": True,
            }
            if cpu_power_w:
                kw["force_cpu_power"] = cpu_power_w
            tracker = OfflineEmissionsTracker(**kw)
            tracker.start()
        except Exception as e:  # pragma: no cover - depends on the machine
            reading.method = f"not measured: codecarbon failed to start ({type(e).__name__}: {e})"
            tracker = None
    else:
        reading.method = "not measured (energy.measure is false)"
    try:
        yield reading
    finally:
        reading.duration_s = time.monotonic() - t0
        if tracker is not None:
            try:
                tracker.stop()
                d = tracker.final_emissions_data
                reading.kwh = float(d.energy_consumed)
                reading.gco2 = float(d.emissions) * 1000.0
                reading.method = MEASURED.format(mode=tracking_mode, country=country_iso_code)
                reading.details = {
                    "cpu_power_w": float(d.cpu_power),
                    "ram_power_w": float(d.ram_power),
                    "gpu_power_w": float(d.gpu_power),
                    "cpu_model": d.cpu_model,
                    "gpu_model": d.gpu_model,
                    "cpu_utilization_percent": d.cpu_utilization_percent,
                }
            except Exception as e:  # pragma: no cover
                reading.method = f"not measured: codecarbon failed to stop ({type(e).__name__}: {e})"


def remote_teacher_energy(
    requests: int,
    tokens_out: int,
    kwh_per_request: Optional[float],
    kwh_per_1k_output_tokens: Optional[float],
    country_iso_code: str,
) -> EnergyReading:
    """Energy of a remote teacher's answers: per 1k output tokens if configured, else per request."""
    gi = grid_intensity(country_iso_code)
    if kwh_per_1k_output_tokens is not None:
        kwh = tokens_out / 1000.0 * kwh_per_1k_output_tokens
        how = f"{kwh_per_1k_output_tokens:g} kWh per 1k output tokens"
    else:
        kwh = requests * (kwh_per_request or 0.0)
        how = f"{kwh_per_request:g} kWh per request"
    method = f"estimated: {how} x {gi:.0f} gCO2e/kWh ({country_iso_code} grid, codecarbon energy-mix data)"
    return EnergyReading("teacher", kwh=kwh, gco2=kwh * gi, method=method)
