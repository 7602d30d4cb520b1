"""A benchmark worker process: builds one case, warms up, then times one call per ``run``."""

from __future__ import annotations

import json
import sys
import time


def _limit_threads(threads: int | None, impl: str) -> None:
    if threads is None:
        return
    if impl == "torch":
        import torch

        torch.set_num_threads(threads)
    else:
        try:
            import numba

            numba.set_num_threads(threads)
        except ImportError:
            pass


def _runner(spec: dict):
    if spec["case"] == "sgemm":
        import numpy as np

        a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
        return lambda: a @ a
    from .cases import CASES

    case = CASES[spec["case"]]
    if spec["impl"] == "torch":
        assert case.torch is not None, f"case {case.name} has no PyTorch side"
        return case.torch(spec["params"], spec["dtype"], spec["mode"])
    import arrayattn as aa

    aa.set_backend(spec.get("backend", "auto"))
    return case.arrayattn(spec["params"], spec["dtype"], spec["mode"])


def main() -> None:
    spec = json.loads(sys.argv[1])
    _limit_threads(spec.get("threads"), spec["impl"])
    run = _runner(spec)
    for _ in range(2):  # warm-up: JIT compiles, allocator and thread-pool start
        run()
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "run":
            start = time.perf_counter()
            run()
            print(f"ok {time.perf_counter() - start:.9f}", flush=True)
        else:
            print(f"error unknown command {command!r}", flush=True)


if __name__ == "__main__":
    main()
