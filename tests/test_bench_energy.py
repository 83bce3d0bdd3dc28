"""bench.energy's arithmetic, with a stand-in for NVML (no GPU here): the joules per image are the
energy counter's difference over the images run, power and clock the samples' medians. The whole
script runs on the CPU with a tiny checkpoint, as it runs on the GPU machine."""
import itertools
import time

import pytest

from bench import energy, gpu_energy
from bench.gpu_energy import EnergyMeter
from workers.tiny_checkpoint import write_tiny_checkpoint

STEP_MJ = 6000       # each read of the stand-in's energy counter finds it 6 J further on


class FakeNvml:
    def __init__(self, index: int = 0):
        self.reads = itertools.count()
        self.powers = itertools.cycle([300_500, 650_000, 690_000])

    def name(self):
        return "Fake GPU"

    def power_limit_mw(self):
        return 700_000

    def energy_mj(self):
        return 1_000_000 + next(self.reads) * STEP_MJ

    def power_mw(self):
        return next(self.powers)

    def sm_mhz(self):
        return 1500


def test_meter_reports_the_counters_difference_and_the_samples_medians():
    with EnergyMeter(FakeNvml(), interval_ms=5) as m:
        time.sleep(0.2)
    assert m.joules == STEP_MJ / 1000
    assert m.watts == 650.0 and m.sm_mhz == 1500.0
    assert 0.2 <= m.seconds < 5


def test_bench_energy_runs_on_the_cpu_with_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_energy, "Nvml", FakeNvml)
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "qwen2_vl", seed=0)
    assert energy.main(["--checkpoint", str(ckpt), "--size", "320x180", "--reps", "2", "--batches", "1,2",
                        "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Fake GPU, power limit 700 W; 320x180")
    rows = [line for line in out.splitlines() if line.startswith("| ours |")]
    # at least 3 forwards a row: 3 of 1 image, then 3 of 2 images; 6 J between each row's reads
    assert [r.split("|")[2].strip() for r in rows] == ["1", "2"]
    assert [float(r.split("|")[4]) for r in rows] == [2.0, 1.0]


class FakeLibNvml:
    """NVML's calling convention: a status back, the value through the last (pointer) argument."""

    def nvmlDeviceGetTotalEnergyConsumption(self, handle, out):
        out._obj.value = 2 ** 40 + 7            # wider than 32 bits
        return 0

    def nvmlDeviceGetClockInfo(self, handle, clock, out):
        out._obj.value = 1755 if clock == gpu_energy.NVML_CLOCK_SM else 0
        return 0

    def nvmlDeviceGetPowerUsage(self, handle, out):
        return 3                                # NVML_ERROR_NOT_SUPPORTED


def test_nvml_readings_pass_the_handle_and_arguments_and_check_the_status():
    nvml = object.__new__(gpu_energy.Nvml)      # without a driver to initialise
    nvml.lib, nvml.handle = FakeLibNvml(), None
    assert nvml.energy_mj() == 2 ** 40 + 7
    assert nvml.sm_mhz() == 1755
    with pytest.raises(RuntimeError, match="GetPowerUsage failed with status 3"):
        nvml.power_mw()
