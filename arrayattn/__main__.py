"""``python -m arrayattn info | check | demo | bench``."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

import arrayattn as aa

from ._gradcheck import directional_errors, random_cotangents
from ._table import table

# : Relative error allowed in ``check``'s float64 dot-product test (the project's correctness
# standard: < 1e-6).
CHECK_TOLERANCE = 1e-6


def cmd_info(args: argparse.Namespace) -> int:
    print(
        f"arrayattn {aa.__version__}  (python {platform.python_version()}, numpy {np.__version__})"
    )
    print(f"backend setting: {aa.get_backend()!r}")
    print(f"registered ops: {len(aa.registered_ops())}")
    rows = []
    for b in aa.backends():
        ops = "-" if b.ops is None else str(len(b.ops))
        rows.append([b.name, "yes" if b.available else "no", ops, b.reason or b.description])
    print(table(rows, ["backend", "available", "ops", "notes"]))
    print("devices:")
    print(f"  cpu: {platform.processor() or platform.machine()}")
    try:
        import cupy

        for i in range(cupy.cuda.runtime.getDeviceCount()):
            name = cupy.cuda.runtime.getDeviceProperties(i)["name"].decode()
            print(f"  cuda:{i}: {name}")
    except Exception as exc:
        print(
            f"  cuda: none ({type(exc).__name__}: {exc})"
            if "cupy" in sys.modules
            else "  cuda: none (cupy not installed)"
        )
    return 0


def _finite_outputs(out) -> bool:
    outs = out if isinstance(out, tuple) else (out,)
    # Logsumexp is +inf for rows with nothing to attend to; NaN is never acceptable.
    return all(not np.isnan(np.asarray(o, dtype=np.float64)).any() for o in outs)


def cmd_check(args: argparse.Namespace) -> int:
    """Every registered op forward and backward on small float64 inputs, gradients vs FD."""
    ops = aa.registered_ops()
    if args.op:
        unknown = sorted(set(args.op) - set(ops))
        if unknown:
            print(f"unknown ops {unknown}; registered: {sorted(ops)}", file=sys.stderr)
            return 2
        ops = {name: ops[name] for name in args.op}
    rng = np.random.default_rng(args.seed)
    rows, failures = [], 0
    for name, op in ops.items():
        if op.examples is None:
            rows.append([name, "-", "-", "-", "FAIL: no examples registered"])
            failures += 1
            continue
        for i, (call_args, call_kwargs) in enumerate(op.examples(rng)):
            label = f"{name}#{i}"
            start = time.perf_counter()
            try:
                out, res = op.fwd(*call_args, **call_kwargs)
                op.bwd(res, random_cotangents(out, rng))
                errors = directional_errors(op, call_args, call_kwargs, rng=rng)
            except Exception as exc:  # report and carry on: check prints every failure
                rows.append([label, "?", "-", "-", f"FAIL: {type(exc).__name__}: {exc}"])
                failures += 1
                continue
            worst = max(errors.values(), default=0.0)
            bad = [k for k, e in errors.items() if e >= CHECK_TOLERANCE]
            ok = worst < CHECK_TOLERANCE and _finite_outputs(out)
            failures += not ok
            rows.append(
                [
                    label,
                    res.backend,
                    f"{worst:.1e}",
                    f"{(time.perf_counter() - start) * 1e3:.0f}",
                    "ok" if ok else f"FAIL: {', '.join(bad) or 'NaN output'}",
                ]
            )
    print(f"arrayattn check: backend setting {aa.get_backend()!r}, float64, finite differences")
    print(table(rows, ["op#example", "backend", "max rel err", "ms", "result"]))
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


def cmd_demo(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 256, 64), dtype=np.float32) for _ in range(3))
    out, res = aa.scaled_dot_product_attention.fwd(q, k, v, causal=True)
    grads = aa.scaled_dot_product_attention.bwd(res, np.ones_like(out))
    print("scaled_dot_product_attention, q/k/v (N=1, H=4, L=256, d=64) float32, causal")
    print(f"  ran on backend {res.backend!r}; out {out.shape} {out.dtype}")
    print(
        "  gradients: "
        + ", ".join(f"{n} {g.shape}" for n, g in grads._asdict().items() if g is not None)
    )
    print(aa.scaled_dot_product_attention.explain(q, k, v, causal=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ._bench import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arrayattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backends and why unavailable, devices")
    check = sub.add_parser("check", help="every op forward+backward vs finite differences")
    check.add_argument("--op", action="append", help="only this op (repeatable)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--backend", help="backend setting for the run (default: current)")
    sub.add_parser("demo", help="a small forward/backward run")
    bench = sub.add_parser("bench", help="timings, GFLOP/s and ratio to PyTorch")
    from ._bench import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)
    command = {"info": cmd_info, "check": cmd_check, "demo": cmd_demo, "bench": cmd_bench}
    backend = getattr(args, "backend", None)
    if backend and args.command == "check":
        with aa.use_backend(backend):
            return command[args.command](args)
    return command[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
