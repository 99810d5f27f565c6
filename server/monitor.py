"""Monitoring samples of the trunk host (the Monitor RPC): CPU, memory, process RSS, GPU (pynvml), session counters
and the runtime's batches and slots. Server telemetry, so it lives with the server."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)


@dataclass
class Counters:
    """Running totals the server keeps; a sampler turns their deltas into rates."""

    active_sessions: int = 0
    total_sessions: int = 0
    total_steps: int = 0
    total_compute_ms: float = 0.0


class GpuProbe:
    """Reads one GPU through NVML; says why when there is none (no driver, no device, pynvml missing)."""

    _lock = threading.Lock()

    def __init__(self, index: int = 0):
        self.handle = None
        self.status = "no GPU"
        try:
            import pynvml

            with self._lock:
                pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self.handle)
            self.status = name.decode() if isinstance(name, bytes) else str(name)
            self._nvml = pynvml
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
            self.status = f"no GPU ({type(e).__name__})"
            self.handle = None

    def fill(self, s: dict) -> None:
        s["gpu_available"] = self.handle is not None
        s["gpu_status"] = self.status
        if self.handle is None:
            return
        nv = self._nvml
        try:
            s["gpu_util_percent"] = nv.nvmlDeviceGetUtilizationRates(self.handle).gpu
            mem = nv.nvmlDeviceGetMemoryInfo(self.handle)
            s["gpu_mem_used_bytes"], s["gpu_mem_total_bytes"] = int(mem.used), int(mem.total)
            s["gpu_temperature_c"] = nv.nvmlDeviceGetTemperature(self.handle, nv.NVML_TEMPERATURE_GPU)
        except Exception as e:
            s["gpu_status"] = f"{self.status} (read failed: {type(e).__name__})"


def _busy_total() -> tuple[float, float]:
    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


class Sampler:
    """One per monitor stream, so rates are measured between this stream's own samples."""

    def __init__(self, gpu: GpuProbe, started: float, clock=time.monotonic):
        """`clock`: what the compute-busy share is measured against (a test gives its own)."""
        self.gpu, self.started, self.clock = gpu, started, clock
        self.process = psutil.Process(os.getpid())
        self._cpu = _busy_total()
        self._prev: tuple[float, int, float] | None = None  # time, steps, compute ms
        self._batches: tuple[int, int, dict, float, int] | None = None  # batches, rows, sizes, wait ms, waited
        self._busy: tuple[float, float] | None = None  # time (s), the runtime's compute ms by then

    def sample(self, c: Counters, runtime=None) -> dict:
        """A sample of the host and of the counters; with the server's runtime (server/runtime.py), its decode
        batches, queue wait and KV slots too. The fields of a MonitorSample message, which the servicer builds."""
        now = time.time()
        busy, total = _busy_total()
        cpu = 100.0 * (busy - self._cpu[0]) / (total - self._cpu[1]) if total > self._cpu[1] else 0.0
        self._cpu = (busy, total)
        vm = psutil.virtual_memory()
        s = dict(
            timestamp=now,
            cpu_percent=max(0.0, min(100.0, cpu)),
            mem_used_bytes=vm.total - vm.available,
            mem_total_bytes=vm.total,
            process_rss_bytes=self.process.memory_info().rss,
            active_sessions=c.active_sessions,
            total_sessions=c.total_sessions,
            total_steps=c.total_steps,
            uptime_s=now - self.started,
        )
        if self._prev is not None:
            dt, dsteps = now - self._prev[0], c.total_steps - self._prev[1]
            s["steps_per_s"] = dsteps / dt if dt > 0 else 0.0
            s["mean_compute_ms"] = (c.total_compute_ms - self._prev[2]) / dsteps if dsteps else 0.0
        self._prev = (now, c.total_steps, c.total_compute_ms)
        if runtime is not None:
            self._fill_runtime(s, runtime)
        self.gpu.fill(s)
        return s

    def _fill_runtime(self, s: dict, runtime) -> None:
        st = runtime.stats
        now = (st.batches, st.batched_rows, dict(st.batch_sizes), st.queue_wait_ms, st.waited)
        s["kv_slots_used"] = runtime.used_slots()
        s["kv_slots_free"] = runtime.slots - s["kv_slots_used"]
        if self._batches is not None:
            batches, rows, sizes, wait, waited = self._batches
            if now[0] > batches:
                s["batch_mean"] = (now[1] - rows) / (now[0] - batches)
                s["batch_max"] = max(n for n, k in now[2].items() if k > sizes.get(n, 0))
            if now[4] > waited:
                s["queue_wait_ms"] = (now[3] - wait) / (now[4] - waited)
        self._batches = now
        t = self.clock()
        if self._busy is not None and t > self._busy[0]:
            share = (st.compute_ms - self._busy[1]) / 1e3 / (t - self._busy[0])
            s["compute_busy_percent"] = max(0.0, min(100.0, 100.0 * share))
        self._busy = (t, st.compute_ms)
