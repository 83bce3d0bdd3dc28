"""An NVIDIA GPU's energy counter, power and SM clock around a stretch of work, from NVML.

Standard library only (NVML through ctypes), so that bench/torch_forward.py (run as a script, with
PyTorch but not the project's packages installed) measures its forward the same way as
bench.energy measures ours. (The GPU image's nvidia-smi does not offer the energy counter.)

    with EnergyMeter() as m:
        ... work, synchronised at both ends ...
    m.joules, m.seconds, m.watts (median of the samples), m.sm_mhz (median)
"""
from __future__ import annotations

import ctypes
import statistics
import threading
import time

NVML_CLOCK_SM = 1


class Nvml:
    """The NVML readings used here, for one GPU (index as NVML counts, which ignores
    CUDA_VISIBLE_DEVICES)."""

    def __init__(self, index: int = 0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.handle = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)), "GetHandleByIndex")

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"NVML {what} failed with status {status}")

    def _read(self, function: str, value_type=ctypes.c_uint, *args) -> int:
        """nvmlDevice<function>(handle, *args, &value) -> value."""
        value = value_type()
        self._check(getattr(self.lib, f"nvmlDevice{function}")(self.handle, *args, ctypes.byref(value)), function)
        return value.value

    def name(self) -> str:
        buf = ctypes.create_string_buffer(96)
        self._check(self.lib.nvmlDeviceGetName(self.handle, buf, 96), "GetName")
        return buf.value.decode()

    def power_limit_mw(self) -> int:
        return self._read("GetEnforcedPowerLimit")

    def energy_mj(self) -> int:
        """Millijoules since the driver loaded."""
        return self._read("GetTotalEnergyConsumption", ctypes.c_ulonglong)

    def power_mw(self) -> int:
        return self._read("GetPowerUsage")

    def sm_mhz(self) -> int:
        return self._read("GetClockInfo", ctypes.c_uint, NVML_CLOCK_SM)


class EnergyMeter:
    """Energy between entering and leaving (the counter's difference), and power draw and SM clock
    sampled every `interval_ms` meanwhile on a thread."""

    def __init__(self, nvml: Nvml | None = None, interval_ms: int = 20):
        self.nvml = nvml or Nvml()
        self.interval = interval_ms / 1e3
        self.joules = self.seconds = self.watts = self.sm_mhz = float("nan")
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._samples.append((self.nvml.power_mw() / 1e3, float(self.nvml.sm_mhz())))

    def __enter__(self) -> "EnergyMeter":
        self._reader = threading.Thread(target=self._sample, daemon=True)
        self._e0, self._t0 = self.nvml.energy_mj(), time.perf_counter()
        self._reader.start()
        return self

    def __exit__(self, *exc) -> None:
        self.joules = (self.nvml.energy_mj() - self._e0) / 1e3
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._reader.join(timeout=10)
        if self._samples:
            self.watts = statistics.median(w for w, _ in self._samples)
            self.sm_mhz = statistics.median(m for _, m in self._samples)
