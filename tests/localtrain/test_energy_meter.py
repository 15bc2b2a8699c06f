"""The energy meter (trainlab.lab.energy) on a fake powercap tree, and the report's energy column."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainlab.lab import energy
from trainlab.lab.energy import EnergyMeter, EnergyReading
from trainlab.lab.report import render_report

RANGE = 262_143_328_850  # a real package's max_energy_range_uj


def _zone(path: Path, name: str, value: int, wrap: int = RANGE) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{value}\n")
    (path / "max_energy_range_uj").write_text(f"{wrap}\n")
    return path / "energy_uj"


@pytest.fixture
def powercap(tmp_path: Path) -> dict[str, Path]:
    """Two packages, one with core and dram subzones, and a psys zone that contains the packages."""
    root = tmp_path / "powercap"
    files = {
        "package-0": _zone(root / "intel-rapl:0", "package-0", 1_000_000),
        "core": _zone(root / "intel-rapl:0" / "intel-rapl:0:0", "core", 500_000),
        "dram": _zone(root / "intel-rapl:0" / "intel-rapl:0:1", "dram", 200_000),
        "package-1": _zone(root / "intel-rapl:1", "package-1", 7_000),
        "psys": _zone(root / "intel-rapl:2", "psys", 9_000_000),
    }
    files["root"] = root
    return files


def test_reads_packages_and_dram_not_core_or_psys(powercap: dict[str, Path]) -> None:
    with EnergyMeter(powercap_root=powercap["root"], nvml=False) as meter:
        powercap["package-0"].write_text("3500000\n")  # +2.5 J
        powercap["core"].write_text("2500000\n")  # inside the package: not added
        powercap["dram"].write_text("700000\n")  # +0.5 J
        powercap["package-1"].write_text("1007000\n")  # +1.0 J
        powercap["psys"].write_text("99000000\n")  # contains the packages: not added
    reading = meter.reading
    assert reading.by_source == pytest.approx(
        {"rapl:package-0": 2.5, "rapl:package-0/dram": 0.5, "rapl:package-1": 1.0}
    )
    assert reading.joules == pytest.approx(4.0)
    assert reading.reason == "NVML: not asked for"
    assert reading.per(8) == pytest.approx(0.5)
    assert reading.cell() == "4"


def test_wraparound_adds_the_counter_range(tmp_path: Path) -> None:
    counter = _zone(tmp_path / "intel-rapl:0", "package-0", RANGE - 100)
    with EnergyMeter(powercap_root=tmp_path, nvml=False) as meter:
        counter.write_text("50\n")
    assert meter.reading.joules == pytest.approx(150e-6)


def test_sampling_catches_each_wrap(tmp_path: Path) -> None:
    """Two wraps inside one run are both counted when a sample falls between them (the poll thread's job)."""
    wrap = 10_000_000  # 10 J
    counter = _zone(tmp_path / "intel-rapl:0", "package-0", 0, wrap=wrap)
    with EnergyMeter(powercap_root=tmp_path, nvml=False, interval_s=3600) as meter:
        counter.write_text("9000000\n")
        meter.sample()
        counter.write_text("4000000\n")  # wrapped: +5 J
        meter.sample()
        counter.write_text("1000000\n")  # wrapped again: +7 J
    assert meter.reading.joules == pytest.approx(9.0 + 5.0 + 7.0)


def test_no_counters_gives_none_and_the_reason(tmp_path: Path) -> None:
    with EnergyMeter(powercap_root=tmp_path / "missing", nvml=False) as meter:
        pass
    reading = meter.reading
    assert reading.joules is None and reading.by_source == {}
    assert f"no powercap tree at {tmp_path / 'missing'}" in reading.reason
    assert reading.per(100) is None
    assert reading.cell().startswith("n/a: RAPL: no powercap tree")

    (tmp_path / "empty").mkdir()
    with EnergyMeter(powercap_root=tmp_path / "empty", nvml=False) as meter:
        pass
    assert meter.reading.joules is None and "no RAPL zone" in meter.reading.reason


def test_unreadable_zone_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "intel-rapl:0"
    bad.mkdir()
    (bad / "name").write_text("package-0\n")
    (bad / "max_energy_range_uj").write_text(f"{RANGE}\n")  # no energy_uj
    good = _zone(tmp_path / "intel-rapl:1", "package-1", 0)
    with EnergyMeter(powercap_root=tmp_path, nvml=False) as meter:
        good.write_text("2000000\n")
    assert meter.reading.joules == pytest.approx(2.0)
    assert str(bad) in meter.reading.reason  # the missing package is said, not silently left out


def test_interval_is_checked() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        EnergyMeter(interval_s=0)


def test_this_machine_reports_a_number_or_the_reason() -> None:
    """On a machine without counters (these CPUs: no powercap tree, no CUDA) the cell says why."""
    with EnergyMeter() as meter:
        sum(range(1000))
    reading = meter.reading
    if reading.joules is None:
        assert reading.cell().startswith("n/a: ") and "RAPL: " in reading.reason
        if not energy.nvml_counters()[0]:
            assert "NVML: " in reading.reason
    else:
        assert reading.joules >= 0 and reading.by_source and reading.cell() != "n/a"


def _result(algorithm: str, joules: float | None, per: float | None, note: str) -> dict:
    return {
        "workload": "w",
        "algorithm": algorithm,
        "seed": 0,
        "metric": "accuracy",
        "higher_is_better": True,
        "target": 0.5,
        "final_metric": 0.6,
        "best_metric": 0.6,
        "steps_to_target": 1,
        "samples_to_target": 10,
        "time_to_target_s": 0.1,
        "samples": 100,
        "wall_time_s": 1.0,
        "step_time_ms_median": 1.0,
        "peak_rss_bytes": 2**20,
        "optimizer_state_bytes": 0,
        "activation_peak_bytes": 0,
        "energy_j": joules,
        "energy_per_sample_j": per,
        "energy_note": note,
        "diverged": False,
    }


def test_report_energy_column_number_or_reason() -> None:
    report = render_report(
        [
            _result("measured", 12.5, 0.125, ""),
            _result("unmeasured", None, None, "RAPL: no powercap tree at /x; NVML: no CUDA device"),
        ]
    )
    assert "| energy (J) | energy per sample (J) |" in report
    row = next(line for line in report.splitlines() if line.startswith("| measured |"))
    assert row.split(" | ")[-3:-1] == ["12.5", "0.125"]
    row = next(line for line in report.splitlines() if line.startswith("| unmeasured |"))
    assert "| n/a | n/a |" in row  # the reason once under the table, not in every row
    assert "Energy n/a: RAPL: no powercap tree at /x; NVML: no CUDA device." in report
    old = _result("old", None, None, "")
    del old["energy_j"], old["energy_note"]
    assert "Energy n/a: not measured" in render_report([old])


def test_reading_cell_formats() -> None:
    assert EnergyReading(1234.5678, "").cell() == "1235"
    assert EnergyReading(1.0, "").cell(0.00012345) == "0.0001234"
    assert EnergyReading(None, "why").cell(3.0) == "n/a: why"


def test_a_zone_that_fails_mid_run_is_left_out_and_named(tmp_path: Path) -> None:
    lost = _zone(tmp_path / "intel-rapl:0", "package-0", 0)
    kept = _zone(tmp_path / "intel-rapl:1", "package-1", 0)
    with EnergyMeter(powercap_root=tmp_path, nvml=False) as meter:
        lost.write_text("garbage\n")
        kept.write_text("3000000\n")
    assert meter.reading.joules == pytest.approx(3.0)  # the run is not lost to a bad read
    assert "stopped being readable" in meter.reading.reason and str(lost) in meter.reading.reason


def test_nvml_counters_are_read_in_millijoules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The GPU path with a stand-in for pynvml's counter: joules = (end - start) mJ / 1000, per device."""
    counters = {"a": 1_000, "b": 50_000}
    synced = []
    gpu = energy._Nvml(["a", "b"], counters.__getitem__, lambda: synced.append(True))
    monkeypatch.setattr(energy, "nvml_counters", lambda: (gpu, ""))
    with EnergyMeter(powercap_root=tmp_path / "missing") as meter:
        counters["a"] += 2_500
        counters["b"] += 500
    assert meter.reading.by_source == pytest.approx({"nvml:0": 2.5, "nvml:1": 0.5})
    assert meter.reading.joules == pytest.approx(3.0) and len(synced) == 2  # the queue drained at both readings
    assert meter.reading.reason.startswith("RAPL: no powercap tree")

    def broken(handle: str) -> int:
        raise RuntimeError("GPU is lost")

    gpu = energy._Nvml(["a"], counters.__getitem__, lambda: None)
    monkeypatch.setattr(energy, "nvml_counters", lambda: (gpu, ""))
    with EnergyMeter(powercap_root=tmp_path / "missing") as meter:
        gpu._read = broken
    assert meter.reading.joules is None and "NVML: the closing reading failed (GPU is lost)" in meter.reading.reason
