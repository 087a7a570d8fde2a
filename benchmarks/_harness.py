"""Shared helpers of the benchmark scripts: interleaved timing, peak memory, machine description, Markdown output."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine_lines(torch_threads: int | None = None) -> list[str]:
    """Markdown bullet lines describing the machine, the software and the date (UTC)."""
    import peft
    import torch
    import transformers

    threads = torch_threads if torch_threads is not None else torch.get_num_threads()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Date: {now}",
        f"- Machine: {cpu_model()}, {os.cpu_count()} logical cores, {memory_total_gib():.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__} ({threads} threads), "
        f"peft {peft.__version__}, transformers {transformers.__version__}",
    ]


class LoadRecorder:
    """Records the 1/5/15-minute load average at the start and the end of a run (other processes share the CPU)."""

    def __init__(self) -> None:
        self.start = load_average()
        self.end: str | None = None

    def stop(self) -> None:
        self.end = load_average()

    def line(self, own_load: float = 0.0, interleaved: bool = True) -> str:
        """`own_load`: the load the benchmark itself puts on the machine (quality.py's recipe runs: their threads)."""
        cores = os.cpu_count() or 1
        end = self.end or load_average()
        busy = max(os.getloadavg()[0], float(self.start.split(" / ")[0])) > 0.5 + own_load
        if busy:
            note = ("other processes (other engineers' tests and training jobs) were running on the same cores, so "
                    "absolute times are noisy" + ("; methods were interleaved so that the noise hits all alike"
                                                  if interleaved else ""))
        else:
            note = "the machine was otherwise quiet" + (f" (the runs themselves load it by about {own_load:g})"
                                                         if own_load else "")
        return f"- Load average (1/5/15 min) at start: {self.start}; at end: {end} on {cores} cores: {note}."


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Timings:
    """Per-call seconds, one sample per round and name: wall clock, and CPU time of this process.

    With one torch thread, CPU time is the work done without the time spent waiting for other processes to leave the
    core, so its ratios are far less noisy on a shared machine; wall clock is what a user waits on a quiet one.
    """

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    repeat: int | None = None,
    min_sample_s: float = 0.05,
) -> Timings:
    """Time every function `rounds` times, in rounds A B C, B C A, C A B, … (rotated so no method always comes first).

    Each sample is the mean of `repeat` back-to-back calls; `repeat=None` picks, per function, enough calls for a
    sample to last about `min_sample_s` (short samples are hit all-or-nothing by the scheduler). `warmup` untimed
    rounds come first.
    """
    names = list(fns)
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for _ in range(warmup):
        for name in names:
            fns[name]()
    repeats = {}
    for name in names:
        repeats[name] = repeat or max(1, math.ceil(min_sample_s / max(timed(fns[name]), 1e-6)))
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = fns[name], repeats[name]
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            for _ in range(n):
                fn()
            timings.wall[name].append((time.perf_counter() - wall_start) / n)
            timings.cpu[name].append((time.process_time() - cpu_start) / n)
    return timings


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of times[name] / times[reference] within the same round."""
    if reference not in times or name not in times:
        return float("nan")
    return median([a / b for a, b in zip(times[name], times[reference])])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """Half the interquartile range relative to the median (a robust relative noise measure)."""
    if len(values) < 4:
        return float("nan")
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2 / statistics.median(values)


def peak_rss_mib() -> float:
    """Peak resident set size of this process's own memory so far, in MiB.

    On Linux this is VmHWM from /proc/self/status: `getrusage(RUSAGE_SELF).ru_maxrss` also counts, across fork + exec,
    the peak of the parent process that started this one (a benchmark parent holding several models would set every
    worker's number). Elsewhere it falls back to ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024**2 if platform.system() == "Darwin" else maxrss / 1024


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def write_result(path: Path | str, text: str) -> Path:
    """Write `text` (Markdown) to `path` and print it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    print(text)
    print(f"\n[written to {path}]")
    return path


def default_output(name: str) -> Path:
    return RESULTS_DIR / f"{name}.md"
