"""How the numba_cuda launchers launch: on the inputs' device, on CuPy's current stream, with no
host synchronisation per launch (findings 3 and 4 of the GPU review).

The simulator has neither devices nor streams, so these tests check what the launchers ask for:
a fake device made current around each launcher, a fake non-blocking stream standing for CuPy's
current stream passed to every launch, and CUDA-array-interface arguments imported without
Numba's stream synchronisation. Whether the driver then orders the work as asked is only seen on
a GPU (``tests/test_gpu.py``).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from arrayattn._reference.neighborhood import na_axis_windows

common = pytest.importorskip("arrayattn.backends.numba_cuda._common")
nc_attention = pytest.importorskip("arrayattn.backends.numba_cuda.attention")
nc_criss_cross = pytest.importorskip("arrayattn.backends.numba_cuda.criss_cross")
nc_neighborhood = pytest.importorskip("arrayattn.backends.numba_cuda.neighborhood")


class _FakeDevice:
    """Stands in for ``cupy.cuda.Device``: entering it makes it the current device."""

    current = [0]

    def __init__(self, dev):
        self.id = dev

    def __enter__(self):
        self.current.append(self.id)
        return self

    def __exit__(self, *exc):
        self.current.pop()


class _OnDevice(np.ndarray):
    """A NumPy array that says it lives on fake device ``dev`` (as a CuPy array's ``device``)."""

    def __new__(cls, a, dev):
        out = np.asarray(a).view(cls)
        out.dev = dev
        return out

    def __array_finalize__(self, obj):
        self.dev = getattr(obj, "dev", None)

    @property
    def device(self):
        return _FakeDevice(self.dev)


class _NonBlockingStream:
    """What ``cuda.external_stream`` returns for CuPy's current (non-blocking) stream."""

    ptr = 0x5EED


def test_caller_stream_is_cupys_current_stream(monkeypatch):
    from numba import cuda

    made = []
    monkeypatch.setattr(cuda, "external_stream", lambda ptr: made.append(ptr) or "external")
    current = types.SimpleNamespace(ptr=_NonBlockingStream.ptr)
    fake_cupy = types.SimpleNamespace(
        cuda=types.SimpleNamespace(get_current_stream=lambda: current)
    )
    assert common.caller_stream(fake_cupy) == "external"
    assert made == [_NonBlockingStream.ptr]
    current.ptr = 0  # CuPy's legacy null stream is Numba's default stream
    assert common.caller_stream(fake_cupy) is not None
    assert made == [_NonBlockingStream.ptr]


def test_launch_imports_arrays_without_synchronising(monkeypatch):
    """Numba synchronises the host with the stream of every CUDA-array-interface argument at
    launch unless it is imported with ``sync=False``; ``launch`` does that and passes NumPy
    arrays (the simulator) and scalars through."""
    from numba import cuda

    imported = []

    class Exported:
        __cuda_array_interface__ = {"stream": _NonBlockingStream.ptr}

    def as_cuda_array(obj, sync=True):
        imported.append(sync)
        return ("device array", obj)

    monkeypatch.setattr(cuda, "as_cuda_array", as_cuda_array, raising=False)
    seen = []

    class Kernel:
        def __getitem__(self, config):
            return lambda *args: seen.append((config, args))

    x, host = Exported(), np.zeros(3)
    common.launch(Kernel(), 4, 32, "stream", x, host, 7)
    assert imported == [False]
    ((config, args),) = seen
    assert config == (4, 32, "stream")
    assert args[0] == ("device array", x)
    assert args[1] is host
    assert args[2] == 7


@pytest.fixture
def recorded_launches(monkeypatch):
    """Every simulated launch as (configuration, current fake device), with the launchers'
    stream replaced by a fake non-blocking stream."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    stream = _NonBlockingStream()
    for module in (nc_attention, nc_criss_cross, nc_neighborhood):
        monkeypatch.setattr(module, "caller_stream", lambda lib: stream)
    monkeypatch.setattr(_FakeDevice, "current", [0])
    launches = []
    getitem = FakeCUDAKernel.__getitem__

    def record(self, config):
        launches.append((tuple(config), _FakeDevice.current[-1]))
        return getitem(self, config)

    monkeypatch.setattr(FakeCUDAKernel, "__getitem__", record)
    return stream, launches


def test_every_launch_on_the_inputs_device_and_the_callers_stream(rng, recorded_launches):
    stream, launches = recorded_launches

    def on_1(shape):
        return _OnDevice(rng.standard_normal(shape), 1)

    q, k, v = on_1((1, 2, 3, 2)), on_1((1, 2, 4, 2)), on_1((1, 2, 4, 2))
    bias = on_1((3, 4))
    out, lse = nc_attention.sdpa_forward(q, k, v, bias=bias, scale=0.5, blocks=(2, 2))
    nc_attention.sdpa_backward(
        q, k, v, out, lse, on_1(out.shape), bias=bias, scale=0.5, blocks=(2, 2)
    )
    x = on_1((1, 2, 3, 2))
    out, lse = nc_criss_cross.criss_cross_forward(x, x, x, scale=0.5)
    nc_criss_cross.criss_cross_backward(x, x, x, out, lse, on_1(out.shape), scale=0.5)
    wy, wx = na_axis_windows(2, 1, 1, "clamp"), na_axis_windows(3, 3, 1, "clamp")
    kw = {"boundary": "clamp", "scale": 0.5, "rel_bias": on_1((1, 5)), "r_w": on_1((5, 2))}
    out, lse = nc_neighborhood.window_attention_forward(x, x, x, wy, wx, **kw)
    nc_neighborhood.window_attention_backward(x, x, x, out, lse, on_1(out.shape), wy, wx, **kw)
    assert len(launches) >= 14
    assert [cfg for cfg, _ in launches if len(cfg) < 3 or cfg[2] is not stream] == []
    assert [dev for _, dev in launches if dev != 1] == []
    assert _FakeDevice.current == [0]
