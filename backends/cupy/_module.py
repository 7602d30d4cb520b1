"""Loading the ``.cu`` sources: lazy ``cupy.RawModule`` per source, and a device-free NVRTC check.

Each source module lists the template instantiations it launches (``NAME_EXPRESSIONS``); the
RawModule is compiled on first use with those ``name_expressions``. :func:`nvrtc_compile` compiles
a source for a given architecture (``sm_80``, ``sm_90``) with NVRTC through ``cuda-bindings``, with
no GPU and no CuPy, so CI checks every source compiles (the CUDA headers come from the
``nvidia-cuda-runtime``/``nvidia-cuda-crt`` wheels, found by ``cuda-pathfinder``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re

__all__ = [
    "OPTIONS",
    "REG_WORDS",
    "current_device",
    "device_of",
    "in_shared",
    "module",
    "nvrtc_compile",
    "on_inputs_device",
    "pixel_launch",
    "resource_usage",
    "source",
    "sources",
]

_HERE = os.path.dirname(__file__)
OPTIONS = ("-std=c++17",)


def sources() -> list[str]:
    """The file names of every ``.cu`` source of this backend."""
    return sorted(f for f in os.listdir(_HERE) if f.endswith(".cu"))


def _read(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as fh:
        return fh.read()


_INCLUDE = re.compile(r'^#include "(_common\.cuh)"$', re.MULTILINE)


def source(name: str) -> str:
    """The text of ``name`` with ``_common.cuh`` pasted in place of its ``#include``: NVRTC gets
    one self-contained source, and CuPy's kernel cache (keyed by the source text) sees every
    change of the header."""
    return _INCLUDE.sub(lambda m: _read(m.group(1)).replace("#pragma once\n", ""), _read(name))


@functools.cache
def module(name: str, name_expressions: tuple[str, ...]):
    """The compiled ``cupy.RawModule`` of ``name`` (compiled once, on first use)."""
    import cupy

    return cupy.RawModule(
        code=source(name), options=OPTIONS, name_expressions=list(name_expressions)
    )


def function(name: str, name_expressions: tuple[str, ...], expr: str, shared_bytes: int = 0):
    """A kernel of ``name``; opts in to more than 48 KiB of dynamic shared memory when needed."""
    fn = module(name, name_expressions).get_function(expr)
    if shared_bytes > 48 * 1024 and fn.max_dynamic_shared_size_bytes < shared_bytes:
        fn.max_dynamic_shared_size_bytes = shared_bytes
    return fn


def device_of(x):
    """The device of ``x`` as a context manager (a ``cupy.cuda.Device``); a null context for an
    array without one (the NumPy arrays that stand in for CuPy's in the host emulation)."""
    dev = getattr(x, "device", None)
    return dev if hasattr(dev, "__enter__") else contextlib.nullcontext()


def on_inputs_device(launcher):
    """Run ``launcher(q, ...)`` with ``q``'s device current: its allocations, the module it
    compiles or loads, the device properties it reads to pick kernels and its launches then
    all use the inputs' device, not whichever device happens to be current."""

    @functools.wraps(launcher)
    def wrapper(q, *args, **kwargs):
        with device_of(q):
            return launcher(q, *args, **kwargs)

    return wrapper


@functools.cache
def _device_props(device_id):
    import cupy

    dev = cupy.cuda.Device(device_id)
    return int(dev.compute_capability), dev.attributes["MaxSharedMemoryPerBlockOptin"]


def current_device():
    """(compute capability as an int, e.g. 90; opt-in shared memory per block in bytes) of the
    current device: the inputs' device, as every launcher runs under :func:`on_inputs_device`."""
    import cupy

    return _device_props(cupy.cuda.Device().id)


#: 32-bit registers a thread's row vectors may take; wider instantiations keep them in shared
#: memory (``TVec`` in ``_common.cuh``), so that no instantiation uses local memory.
REG_WORDS = 128
#: Dynamic shared memory a launch may take without opting in.
DEFAULT_SHARED = 48 * 1024


def in_shared(vectors: int, acc: str, dmax: int) -> bool:
    """Whether ``vectors`` row vectors of ``dmax`` values of ``acc`` per thread go to shared
    memory (the ``SH`` template argument of the kernels)."""
    return vectors * dmax * (2 if acc == "double" else 1) > REG_WORDS


def pixel_launch(n: int, per_thread_bytes: int, most: int = 128):
    """``(grid, block, shared bytes)`` of a kernel with one thread per item of ``n`` whose
    threads keep ``per_thread_bytes`` of shared memory each (their row vectors, or nothing):
    ``most`` threads a block, or as many as the device's opt-in shared memory holds (whole
    warps where that is 32 or more, at least one)."""
    threads = most
    if per_thread_bytes:
        budget = max(DEFAULT_SHARED, current_device()[1])
        threads = max(1, min(most, budget // per_thread_bytes))
        if threads >= 32:
            threads -= threads % 32
    return (-(-n // threads),), (threads,), threads * per_thread_bytes


def _include_dir() -> str:
    import cuda.pathfinder

    found = cuda.pathfinder.find_nvidia_header_directory("cudart")
    if found is None:
        raise RuntimeError("the CUDA runtime headers (nvidia-cuda-runtime wheel) were not found")
    return found


def _nvrtc_program(name, arch, name_expressions, extra_options=()):
    """Compile ``name`` with NVRTC: ``(program, log, error)``; the caller destroys the program."""
    from cuda.bindings import nvrtc

    prog = _check(
        nvrtc.nvrtcCreateProgram(source(name).encode(), name.encode(), 0, [], []),
        "nvrtcCreateProgram",
    )
    for expr in name_expressions:
        _check(nvrtc.nvrtcAddNameExpression(prog, expr.encode()), f"nvrtcAddNameExpression({expr})")
    opts = [f"--gpu-architecture={arch}".encode(), f"-I{_include_dir()}".encode()]
    opts += [o.encode() for o in (*OPTIONS, *extra_options)]
    err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    return prog, log.decode(errors="replace"), err


def _check(result, what):
    from cuda.bindings import nvrtc

    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def nvrtc_compile(name: str, arch: str, name_expressions: tuple[str, ...] = ()) -> bytes:
    """Compile ``name`` for ``arch`` (e.g. ``"sm_90"``) with NVRTC; return the CUBIN.

    Raises ``RuntimeError`` with the compiler log when compilation fails. Needs ``cuda-bindings``
    and the NVRTC library (``nvidia-cuda-nvrtc``), no device.
    """
    from cuda.bindings import nvrtc

    prog, log, err = _nvrtc_program(name, arch, name_expressions)
    try:
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{name} does not compile for {arch}:\n{log}")
        for expr in name_expressions:
            _check(nvrtc.nvrtcGetLoweredName(prog, expr.encode()), f"nvrtcGetLoweredName({expr})")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


_PTXAS_ENTRY = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def resource_usage(name: str, arch: str, name_expressions: tuple[str, ...]) -> dict[str, dict]:
    """What ``ptxas -v`` reports for every instantiation of ``name`` compiled for ``arch``.

    Returns ``{expr: {"registers", "stack", "spill_stores", "spill_loads"}}`` (bytes per thread
    for the last three; ``stack`` is the local-memory frame, which holds arrays indexed at run
    time as well as spills). Compiled with NVRTC (``--ptxas-options=-v``), no device needed.
    """
    from cuda.bindings import nvrtc

    prog, log, err = _nvrtc_program(name, arch, name_expressions, ("--ptxas-options=-v",))
    try:
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{name} does not compile for {arch}:\n{log}")
        lowered = {}
        for expr in name_expressions:
            low = _check(nvrtc.nvrtcGetLoweredName(prog, expr.encode()), "nvrtcGetLoweredName")
            lowered[low.decode() if isinstance(low, bytes) else low] = expr
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    usage, current = {}, None
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = lowered.get(m.group(1))
        elif current is not None and (m := _PTXAS_STACK.search(line)):
            usage[current] = dict(
                zip(("stack", "spill_stores", "spill_loads"), map(int, m.groups()), strict=True)
            )
        elif current is not None and (m := _PTXAS_REGS.search(line)):
            usage[current]["registers"] = int(m.group(1))
            current = None
    missing = set(name_expressions) - set(usage)
    if missing:
        raise RuntimeError(f"ptxas reported nothing for {sorted(missing)}:\n{log[:2000]}")
    return usage
