"""Energy and CO2e of a run, via codecarbon in offline mode (no network), labelled measured or estimated.

codecarbon reads Intel RAPL counters where the kernel exposes them (/sys/class/powercap: *measured* CPU
energy) and otherwise models CPU power from the processor's TDP and this process's CPU load (*estimated*);
RAM power is always modelled, GPUs are measured through NVML. The run card says which one applied.
CO2e = energy x the carbon intensity of the configured country's grid mix (codecarbon's table).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass


@dataclass
class EnergyReport:
    kwh: float
    co2e_kg: float
    source: str  # "measured (...)" or "estimated (...)"
    country: str

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.kwh * 1000:.2f} Wh, {self.co2e_kg * 1000:.2f} g CO2e ({self.country} grid mix); "
                f"{self.source}")


class EnergyMeter:
    """start() ... stop() -> EnergyReport | None. Never fails a run: problems give None and a reason."""

    def __init__(self, enabled: bool, country: str, tracking_mode: str = "process", measure_power_secs: float = 10):
        # tracking_mode "machine": the whole machine's load (a server in another process plus its clients)
        self.enabled, self.country = enabled, country
        self.tracking_mode, self.measure_power_secs = tracking_mode, measure_power_secs
        self.tracker = None
        self.reason = "disabled (train.energy false)" if not enabled else ""

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            from codecarbon import OfflineEmissionsTracker
        except ImportError:
            self.reason = "not measured: codecarbon is not installed (pip install codecarbon)"
            return
        for name in ("codecarbon",):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            self.tracker = OfflineEmissionsTracker(country_iso_code=self.country, save_to_file=False,
                                                   log_level="error", tracking_mode=self.tracking_mode,
                                                   measure_power_secs=self.measure_power_secs)
            self.tracker.start()
        except Exception as e:  # codecarbon probes hardware; a probe failing must not stop training
            self.tracker, self.reason = None, f"not measured: codecarbon failed to start ({e})"

    def stop(self) -> EnergyReport | None:
        if self.tracker is None:
            return None
        try:
            co2e = self.tracker.stop() or 0.0
            data = self.tracker.final_emissions_data
            return EnergyReport(kwh=float(data.energy_consumed), co2e_kg=float(co2e), source=self._source(),
                                country=self.country)
        except Exception as e:
            self.reason = f"not measured: codecarbon failed ({e})"
            return None

    def _source(self) -> str:
        modes = []
        for hw in getattr(self.tracker, "_hardware", []):
            kind = type(hw).__name__
            mode = getattr(hw, "_mode", None)
            if kind == "CPU":
                modes.append("CPU measured by RAPL" if mode in ("intel_rapl", "intel_power_gadget")
                             else f"CPU estimated from TDP x load ({mode})")
            elif kind == "GPU":
                modes.append("GPU measured by NVML")
            elif kind == "RAM":
                modes.append("RAM estimated")
        measured = any("measured" in m for m in modes if m.startswith("CPU") or m.startswith("GPU"))
        return ("measured" if measured else "estimated") + (f" ({'; '.join(modes)})" if modes else "")
