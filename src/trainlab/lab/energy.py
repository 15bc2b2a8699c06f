"""Measured energy of a run: Intel RAPL package counters and NVML GPU counters, or the reason there are none.

"Beyond Backpropagation" (Spyra, 2025) compares training methods on energy read from the hardware (NVML).
``EnergyMeter`` reads the same kind of counters around a block of code:

- **RAPL** (CPU): the powercap tree, ``<root>/intel-rapl:N/energy_uj`` (one zone per package; AMD's RAPL
  appears under the same name) and its ``dram`` subzone where there is one (DRAM energy is outside the
  package counter; the core and uncore subzones are inside it, so they are not added). The counter is in
  microjoules and wraps at ``max_energy_range_uj``: a reading below the previous one adds that range. While the
  meter is open, a background thread reads the counters every ``interval_s`` seconds so that a wrap (at 100 W
  a 262 kJ range wraps every 44 minutes) is never missed twice over.
- **NVML** (GPU): ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded, Volta and
  newer) for every visible CUDA device, through ``pynvml`` (the ``nvidia-ml-py`` package). The CUDA queue is
  drained (``torch.cuda.synchronize``) before each reading, so queued kernels are counted.

Counters are the whole package's and the whole GPU's: on a shared machine they include other processes'
energy. Nothing is estimated: when no counter can be read, ``joules`` is ``None`` and ``reason`` says why
(no powercap tree, a counter not readable by this user, no CUDA device, no pynvml). The report shows
``n/a: <reason>`` in the energy column then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POWERCAP_ROOT = Path("/sys/class/powercap")
_MICRO = 1e-6
_MILLI = 1e-3


@dataclass(frozen=True)
class EnergyReading:
    """Joules measured while a meter was open (``None`` with ``reason`` when nothing could be measured).

    ``by_source`` has the joules of each counter (``rapl:package-0``, ``nvml:0``, ...); ``reason`` also names
    the counters that were missing when others were read (empty when all were there).
    """

    joules: float | None
    reason: str
    by_source: dict[str, float] = field(default_factory=dict)

    def per(self, count: float) -> float | None:
        """Joules per item (per sample): ``None`` when nothing was measured or ``count`` is not positive."""
        return None if self.joules is None or not count or count <= 0 else self.joules / count

    def cell(self, value: float | None = None) -> str:
        """A report cell: ``value`` (default: the total joules) to 4 significant digits, or ``n/a: <reason>``."""
        value = self.joules if value is None else value
        return f"n/a: {self.reason}" if self.joules is None or value is None else f"{value:.4g}"


@dataclass
class _RaplZone:
    name: str
    counter: Path
    wrap: int  # max_energy_range_uj
    last: int = 0
    total: int = 0  # microjoules accumulated since the meter opened
    error: str = ""  # set when a reading failed: the zone is left out of the total, and the reason says so

    def read(self) -> int:
        return int(self.counter.read_text().strip())

    def sample(self) -> None:
        if self.error:
            return
        try:
            now = self.read()
        except (OSError, ValueError) as err:
            self.error = f"{self.counter} stopped being readable ({err})"
            return
        delta = now - self.last
        if delta < 0:  # the counter wrapped once since the last reading
            delta += self.wrap
        self.total += delta
        self.last = now


def rapl_zones(root: str | Path = POWERCAP_ROOT) -> tuple[list[_RaplZone], str]:
    """The readable RAPL zones under ``root`` (packages and their DRAM subzones), or ``([], reason)``."""
    root = Path(root)
    if not root.is_dir():
        return [], f"no powercap tree at {root}"
    candidates = []
    for top in sorted(root.glob("intel-rapl:*")):
        if top.name.count(":") != 1:
            continue  # subzones are taken below, from their package
        name = _read_name(top)
        if name is not None and name.startswith("psys"):
            continue  # the platform zone contains the packages: adding it would count them twice
        candidates.append((name or top.name, top))
        for sub in sorted(top.glob(f"{top.name}:*")):
            if (_read_name(sub) or "") == "dram":
                candidates.append((f"{name or top.name}/dram", sub))
    if not candidates:
        return [], f"no RAPL zone (intel-rapl:*) under {root}"
    zones, problems = [], []
    for name, path in candidates:
        try:
            zone = _RaplZone(name, path / "energy_uj", int((path / "max_energy_range_uj").read_text().strip()))
            zone.last = zone.read()
        except PermissionError:
            problems.append(f"{path / 'energy_uj'} not readable by this user (root only since Linux 5.10)")
        except (OSError, ValueError) as err:
            problems.append(f"{path}: {err}")
        else:
            zones.append(zone)
    return zones, "; ".join(problems)


def _read_name(zone: Path) -> str | None:
    try:
        return (zone / "name").read_text().strip()
    except OSError:
        return None


class _Nvml:
    """Total-energy counters of every visible CUDA device, through pynvml."""

    def __init__(self, handles: list[Any], read: Callable[[Any], int], synchronize: Callable[[], None]) -> None:
        self.handles, self._read, self._synchronize = handles, read, synchronize
        self.start = [0] * len(handles)

    def millijoules(self) -> list[int]:
        self._synchronize()
        return [self._read(h) for h in self.handles]


def nvml_counters() -> tuple[_Nvml | None, str]:
    """The NVML energy counters of the visible CUDA devices, or ``(None, reason)``."""
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        import pynvml
    except ImportError:
        return None, "CUDA device but no pynvml (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        handles = [_nvml_handle(pynvml, i) for i in range(torch.cuda.device_count())]
        for h in handles:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except pynvml.NVMLError as err:
        return None, f"NVML energy counter not available: {err}"
    return _Nvml(handles, pynvml.nvmlDeviceGetTotalEnergyConsumption, torch.cuda.synchronize), ""


def _nvml_handle(pynvml: Any, index: int) -> Any:
    """The NVML handle of torch's CUDA device ``index``, matched by UUID (NVML's order can differ from CUDA's,
    and CUDA_VISIBLE_DEVICES renumbers); by index where the UUID is not known."""
    import torch

    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


class EnergyMeter:
    """Joules spent while the ``with`` block runs, from every counter this machine exposes.

    ``with EnergyMeter() as meter: ...`` then ``meter.reading`` (an ``EnergyReading``). ``powercap_root``
    points the RAPL reader at another tree (tests use a fake one); ``nvml=False`` skips the GPU counters.
    """

    def __init__(self, *, powercap_root: str | Path = POWERCAP_ROOT, nvml: bool = True, interval_s: float = 30.0):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        self.powercap_root, self.nvml, self.interval_s = Path(powercap_root), nvml, interval_s
        self.reading: EnergyReading | None = None
        self._zones: list[_RaplZone] = []
        self._gpu: _Nvml | None = None
        self._reasons: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EnergyMeter:
        self._zones, rapl_reason = rapl_zones(self.powercap_root)
        self._reasons = [f"RAPL: {rapl_reason}"] if rapl_reason else []
        if self.nvml:
            self._gpu, gpu_reason = nvml_counters()
            if gpu_reason:
                self._reasons.append(f"NVML: {gpu_reason}")
            if self._gpu is not None:
                self._gpu.start = self._gpu.millijoules()
        else:
            self._reasons.append("NVML: not asked for")
        self.reading = None
        if self._zones:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="trainlab-energy", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Read the RAPL counters now (the background thread does this every ``interval_s``)."""
        with self._lock:
            for zone in self._zones:
                zone.sample()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        by_source: dict[str, float] = {}
        if self._gpu is not None:
            try:
                ends = self._gpu.millijoules()
            except Exception as err:  # an NVML error loses the GPU reading (said in the reason), not the run
                self._reasons.append(f"NVML: the closing reading failed ({err})")
            else:
                for i, (start, end) in enumerate(zip(self._gpu.start, ends, strict=True)):
                    by_source[f"nvml:{i}"] = (end - start) * _MILLI
        self.sample()
        for zone in self._zones:
            if zone.error:
                self._reasons.append(f"RAPL: {zone.error}")
            else:
                by_source[f"rapl:{zone.name}"] = zone.total * _MICRO
        reason = "; ".join(self._reasons)
        self.reading = EnergyReading(sum(by_source.values()) if by_source else None, reason, by_source)
