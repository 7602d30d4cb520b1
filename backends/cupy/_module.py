"""Loading the ``.cu`` sources: lazy ``cupy.RawModule`` per source, and a device-free NVRTC check.

Each source module lists the template instantiations it launches (``NAME_EXPRESSIONS``); the
RawModule is compiled on first use with those ``name_expressions``. :func:`nvrtc_compile` compiles
a source for a given architecture (``sm_80``, ``sm_90``) with NVRTC through ``cuda-bindings``, with
no GPU and no CuPy, so CI checks every source compiles (the CUDA headers come from the
``nvidia-cuda-runtime``/``nvidia-cuda-crt`` wheels, found by ``cuda-pathfinder``).
"""

from __future__ import annotations

import functools
import os

__all__ = ["OPTIONS", "module", "nvrtc_compile", "source", "sources"]

_HERE = os.path.dirname(__file__)
OPTIONS = ("-std=c++17",)


def sources() -> list[str]:
    """The file names of every ``.cu`` source of this backend."""
    return sorted(f for f in os.listdir(_HERE) if f.endswith(".cu"))


def source(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as fh:
        return fh.read()


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


def _include_dir() -> str:
    import cuda.pathfinder

    found = cuda.pathfinder.find_nvidia_header_directory("cudart")
    if found is None:
        raise RuntimeError("the CUDA runtime headers (nvidia-cuda-runtime wheel) were not found")
    return found


def nvrtc_compile(name: str, arch: str, name_expressions: tuple[str, ...] = ()) -> bytes:
    """Compile ``name`` for ``arch`` (e.g. ``"sm_90"``) with NVRTC; return the CUBIN.

    Raises ``RuntimeError`` with the compiler log when compilation fails. Needs ``cuda-bindings``
    and the NVRTC library (``nvidia-cuda-nvrtc``), no device.
    """
    from cuda.bindings import nvrtc

    def check(result, what):
        err = result[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{what} failed: {err}")
        return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)

    prog = check(
        nvrtc.nvrtcCreateProgram(source(name).encode(), name.encode(), 0, [], []),
        "nvrtcCreateProgram",
    )
    try:
        for expr in name_expressions:
            check(
                nvrtc.nvrtcAddNameExpression(prog, expr.encode()), f"nvrtcAddNameExpression({expr})"
            )
        opts = [f"--gpu-architecture={arch}".encode(), f"-I{_include_dir()}".encode()]
        opts += [o.encode() for o in OPTIONS]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(
                f"{name} does not compile for {arch}:\n{log.decode(errors='replace')}"
            )
        for expr in name_expressions:
            check(nvrtc.nvrtcGetLoweredName(prog, expr.encode()), f"nvrtcGetLoweredName({expr})")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
