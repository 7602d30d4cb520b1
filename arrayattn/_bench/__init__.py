"""``python -m arrayattn bench``: arrayattn vs PyTorch, each in its own process, alternating calls.

Thread pools of two libraries in one process slow each other (see the CPU notes), so every
implementation runs in a worker process of its own (``python -m arrayattn._bench.worker``). After
warm-up the parent asks the workers for one timed call each in turn, ``repeat`` times, and reports
medians, GFLOP/s, the fraction of the machine's sgemm rate, and the ratio arrayattn / torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from .._table import table
from .cases import CASES

__all__ = ["Worker", "add_arguments", "compare", "main", "parse_params"]


class Worker:
    """One implementation in a subprocess; ``time()`` runs one call and returns its seconds."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arrayattn._bench.worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self._expect("ready")

    def _expect(self, word: str) -> str:
        line = self.stdout.readline()
        if not line.startswith(word):
            self.close()
            raise RuntimeError(f"bench worker {self.spec} failed (said {line!r})")
        return line[len(word) :].strip()

    def ask(self, command: str) -> str:
        self.stdin.write(command + "\n")
        self.stdin.flush()
        return self._expect("ok")

    def time(self) -> float:
        return float(self.ask("run"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.stdin.write("quit\n")
                self.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=30)


def parse_params(text: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    params = dict(defaults)
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise SystemExit(f"unknown size parameter {key!r}; this case takes {sorted(defaults)}")
        params[key] = int(value)
    return params


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:40]:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


#: Pause before each timed call. An OpenMP or OpenBLAS pool keeps spinning for a while after its
#: last parallel region; without the pause the previous worker's spinning threads take the cores
#: from the next worker's call (a 10 ms two-thread kernel measured 6x slower that way).
GAP_SECONDS = 0.25


def compare(
    specs: list[dict[str, Any]], repeat: int, label: str = "", gap: float = GAP_SECONDS
) -> list[list[float]]:
    """Times of every spec, alternating one call each per round; each spec in its own process."""
    workers = []
    try:
        for spec in specs:
            workers.append(Worker(spec))
        times: list[list[float]] = [[] for _ in specs]
        for r in range(repeat):
            for i, w in enumerate(workers):
                time.sleep(gap)
                times[i].append(w.time())
            _progress(r + 1, repeat, label)
        return times
    finally:
        for w in workers:
            w.close()


def sgemm_rate(threads: int | None) -> float:
    """The machine's float32 matrix-multiply rate in GFLOP/s (NumPy's BLAS, 2048³, median)."""
    spec = {"case": "sgemm", "impl": "numpy", "threads": threads}
    (times,) = compare([spec], 5, "sgemm 2048³")
    return 2 * 2048**3 / statistics.median(times) / 1e9


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--case", action="append", choices=sorted(CASES), help="case (repeatable; default all)"
    )
    p.add_argument("--size", help="size parameters, e.g. B=1,H=8,L=2048,d=64")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--mode", action="append", choices=["fwd", "fwd_bwd"], help="default both")
    p.add_argument(
        "--backend",
        action="append",
        help=(
            "arrayattn backend setting (repeatable: each backend in its own process; default auto)"
        ),
    )
    p.add_argument("--causal", action="store_true", help="causal attention where the case has it")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument(
        "--threads", type=int, default=None, help="threads for both sides (default: all)"
    )
    p.add_argument("--no-torch", action="store_true", help="time arrayattn only")
    p.add_argument(
        "--gap",
        type=float,
        default=GAP_SECONDS,
        help="seconds of idle before each timed call, so the other worker's thread pool sleeps",
    )


def main(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401

        have_torch = not args.no_torch
    except ImportError:
        have_torch = False
    rate = sgemm_rate(args.threads)
    rows = []
    for name in args.case or sorted(CASES):
        case = CASES[name]
        params = parse_params(args.size, case.defaults)
        if args.causal and "causal" in params:
            params["causal"] = 1
        for mode in args.mode or ["fwd", "fwd_bwd"]:
            base = {
                "case": name,
                "params": params,
                "dtype": args.dtype,
                "mode": mode,
                "threads": args.threads,
            }
            specs = [{**base, "impl": "arrayattn", "backend": b} for b in args.backend or ["auto"]]
            if have_torch and case.torch is not None:
                specs.append({**base, "impl": "torch"})
            times = compare(specs, args.repeat, f"{name} {mode}", args.gap)
            flops = case.flops(params, mode)
            meds = [statistics.median(t) for t in times]
            torch_median = meds[-1] if specs[-1]["impl"] == "torch" else None
            for spec, med in zip(specs, meds, strict=True):
                gflops = flops / med / 1e9
                ratio = (
                    f"{med / torch_median:.2f}"
                    if torch_median is not None and spec["impl"] == "arrayattn"
                    else ""
                )
                rows.append(
                    [
                        name,
                        ",".join(f"{k}={v}" for k, v in params.items()),
                        mode,
                        spec["impl"]
                        + (f"[{spec['backend']}]" if spec["impl"] == "arrayattn" else ""),
                        f"{med * 1e3:.1f}",
                        f"{gflops:.1f}",
                        f"{gflops / rate:.2f}",
                        ratio,
                    ]
                )
    print(
        f"{args.dtype}; sgemm rate here: {rate:.0f} GFLOP/s; medians of {args.repeat} alternating "
        "calls"
    )
    print(
        table(
            rows,
            ["case", "size", "mode", "impl", "median ms", "GFLOP/s", "of sgemm", "time / torch"],
        )
    )
    return 0
