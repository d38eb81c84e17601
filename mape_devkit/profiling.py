"""Wall time and peak memory of a block of code, on CPU or CUDA."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


class measure:
    """``with measure(device) as m: ...`` then ``m.seconds`` and ``m.peak_memory_mb``.

    CUDA: peak allocated tensor memory above the start. CPU: peak resident-set growth above the
    start, sampled every 50 ms (a lower bound for very short spikes; polling more often costs
    measurable throughput on a 2-core machine).
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.result = Measurement()
        self._stop = threading.Event()

    def _poll(self, baseline: int) -> None:
        peak = baseline
        while not self._stop.wait(0.05):
            peak = max(peak, _rss_bytes())
        self._peak = max(peak, _rss_bytes())

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._baseline = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, args=(self._baseline,), daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = self._peak
        self.result.seconds = time.perf_counter() - self._start
        self.result.peak_memory_mb = max(0, peak - self._baseline) / 2**20
