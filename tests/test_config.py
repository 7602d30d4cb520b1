"""The backend setting (precedence, scoping across threads and tasks) and the backend registry."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import arrayattn as aa
from support import has_kernel

SDPA = aa.scaled_dot_product_attention
ENV = "ARRAYATTN_BACKEND"
NAMES = ["cupy", "numba_cuda", "numba", "array_api"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Each test starts with no environment setting; set_backend calls are made in copied
    contexts."""
    monkeypatch.delenv(ENV, raising=False)


def in_fresh_context(fn, *args):
    """Run ``fn`` in a copy of the current context, so its set_backend does not outlive it."""
    return contextvars.copy_context().run(fn, *args)


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, 3, 4)) for _ in range(3))


def test_default_is_auto():
    assert aa.get_backend() == "auto"


def test_precedence(monkeypatch):
    def body():
        monkeypatch.setenv(ENV, "numba")
        assert aa.get_backend() == "numba"  # environment > auto
        aa.set_backend("array_api")
        assert aa.get_backend() == "array_api"  # set_backend > environment
        with aa.use_backend("cupy"):
            assert aa.get_backend() == "cupy"  # context manager > set_backend
            aa.set_backend("numba_cuda")  # set_backend inside the block does not beat it ...
            assert aa.get_backend() == "cupy"
        assert aa.get_backend() == "numba_cuda"  # ... but holds once the block has ended
        aa.set_backend("auto")
        assert aa.get_backend() == "auto"  # an explicit "auto" also overrides the environment

    in_fresh_context(body)
    assert aa.get_backend() == "numba"  # the copied context's set_backend did not leak


def test_environment_variable_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv(ENV, "array_api")
    assert aa.get_backend() == "array_api"
    monkeypatch.setenv(ENV, "  numba  ")
    assert aa.get_backend() == "numba"  # surrounding whitespace is forgiven
    monkeypatch.setenv(ENV, "")
    assert aa.get_backend() == "auto"


def test_environment_variable_in_a_new_process():
    code = "import arrayattn as aa; print(aa.get_backend())"
    env = dict(os.environ, **{ENV: "array_api"})
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "array_api"


def test_nested_context_managers_restore():
    with aa.use_backend("array_api"):
        with aa.use_backend("numba"):
            with aa.use_backend("cupy"):
                assert aa.get_backend() == "cupy"
            assert aa.get_backend() == "numba"
        assert aa.get_backend() == "array_api"
    assert aa.get_backend() == "auto"


def test_context_manager_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with aa.use_backend("array_api"):
            raise RuntimeError("boom")
    assert aa.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["torch", "", "Numba", "auto ", None, 3, "array-api"])
def test_invalid_names(bad):
    with pytest.raises(ValueError, match=r"set_backend\(name\).*array_api"):
        in_fresh_context(aa.set_backend, bad)
    with pytest.raises(ValueError, match=r"use_backend\(name\)"):
        with aa.use_backend(bad):
            pass
    assert aa.get_backend() == "auto"


def test_invalid_environment_variable(monkeypatch, qkv):
    monkeypatch.setenv(ENV, "fastest")
    with pytest.raises(ValueError, match="ARRAYATTN_BACKEND.*'fastest'"):
        aa.get_backend()
    with pytest.raises(ValueError, match="ARRAYATTN_BACKEND"):
        SDPA(*qkv)
    with aa.use_backend("array_api"):  # an explicit setting does not consult the environment
        SDPA(*qkv)


def test_threads_do_not_share_settings():
    seen = {}
    barrier = threading.Barrier(2, timeout=30)

    def worker(name):
        seen[name, "start"] = aa.get_backend()  # a new thread starts from the default
        aa.set_backend(name)
        barrier.wait()  # both threads have set theirs
        with aa.use_backend("array_api" if name == "numba" else "numba"):
            barrier.wait()
            seen[name, "scoped"] = aa.get_backend()
        seen[name, "end"] = aa.get_backend()

    def main():
        aa.set_backend("cupy")
        with aa.use_backend("numba_cuda"):
            threads = [threading.Thread(target=worker, args=(n,)) for n in ("numba", "array_api")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert aa.get_backend() == "numba_cuda"
        assert aa.get_backend() == "cupy"

    in_fresh_context(main)
    assert seen == {
        ("numba", "start"): "auto",
        ("array_api", "start"): "auto",
        ("numba", "scoped"): "array_api",
        ("array_api", "scoped"): "numba",
        ("numba", "end"): "numba",
        ("array_api", "end"): "array_api",
    }
    assert aa.get_backend() == "auto"


def test_asyncio_tasks_do_not_share_settings(qkv):
    async def task(name, other_started, i_started):
        with aa.use_backend(name):
            i_started.set()
            await other_started.wait()  # the other task is inside its own block now
            await asyncio.sleep(0)
            seen = aa.get_backend()
            out, res = SDPA.fwd(*qkv) if name == "array_api" else (None, None)
        aa.set_backend(name)  # stays inside this task's context copy
        return seen, (res.backend if res else None), aa.get_backend()

    async def main():
        a_started, b_started = asyncio.Event(), asyncio.Event()
        results = await asyncio.gather(
            task("array_api", b_started, a_started), task("cupy", a_started, b_started)
        )
        return results, aa.get_backend()

    results, after = asyncio.run(main())
    assert results == [("array_api", "array_api", "array_api"), ("cupy", None, "cupy")]
    assert after == "auto"
    assert aa.get_backend() == "auto"


# -- the registry ---------------------------------------------------------------------------------


def test_backends_lists_all_four_with_reasons():
    infos = aa.backends()
    assert [b.name for b in infos] == NAMES
    for b in infos:
        assert isinstance(b.description, str)
        assert b.description
        if b.available:
            assert b.reason is None
            assert isinstance(b.ops, tuple)
        else:
            assert isinstance(b.reason, str)
            assert b.reason
            assert b.ops is None
    ref = infos[-1]
    assert ref.available
    assert {"scaled_dot_product_attention", "multi_head_attention"} <= set(ref.ops)
    assert set(ref.ops) == set(aa.registered_ops())


def test_unavailable_backend_raises_with_every_reason(qkv):
    with aa.use_backend("cupy"):
        with pytest.raises(aa.BackendError) as info:
            SDPA(*qkv)
    message = str(info.value)
    assert "'cupy'" in message
    assert "scaled_dot_product_attention" in message
    for name in NAMES:
        assert f"\n  {name}: " in message, name
    # cupy rejects numpy arrays whether or not it is installed
    assert "cupy: takes cupy arrays, got numpy arrays" in message
    assert "array_api: eligible" in message
    assert isinstance(info.value, RuntimeError)


def test_no_silent_fallback_for_numpy_only_backend():
    torch = pytest.importorskip("torch")
    q = torch.ones((2, 3, 4), dtype=torch.float64)
    with aa.use_backend("numba"):
        with pytest.raises(aa.BackendError, match="numba: takes numpy arrays, got torch arrays"):
            SDPA(q, q, q)
        with pytest.raises(aa.BackendError):
            SDPA.fwd(q, q, q)


def _op_without_numba_kernel():
    """A registered, non-composite op that numba has no kernel for (None if every op has one)."""
    for op in aa.registered_ops().values():
        if not op.composite and not has_kernel(op, "numba"):
            return op
    return None


def test_backend_without_a_kernel_raises():
    info = {b.name: b for b in aa.backends()}["numba"]
    if not info.available:
        pytest.skip(f"numba unavailable: {info.reason}")
    op = _op_without_numba_kernel()
    if op is None:
        pytest.skip("every registered op has a numba kernel")
    args, kwargs = op.examples(np.random.default_rng(0))[0]
    with aa.use_backend("numba"):
        with pytest.raises(aa.BackendError, match=f"numba: has no kernel for {op.name}"):
            op(*args, **kwargs)


def test_composite_op_runs_its_inner_ops_on_the_chosen_backend(qkv):
    if not has_kernel(SDPA, "numba"):
        pytest.skip("numba has no SDPA kernel here")
    rng = np.random.default_rng(0)
    args, kwargs = aa.multi_head_attention.examples(rng)[0]
    with aa.use_backend("numba"):
        y, res = aa.multi_head_attention.fwd(*args, **kwargs)
        grads = aa.multi_head_attention.bwd(res, np.ones_like(y))
    assert res.backend == "numba"
    assert dict(res.nested)["attn"].backend == "numba"  # the nested SDPA residual
    assert grads.x_q.shape == args[0].shape


def test_auto_picks_an_eligible_backend(qkv):
    out, res = SDPA.fwd(*qkv)
    expected = "numba" if has_kernel(SDPA, "numba") else "array_api"
    assert res.backend == expected
    assert f"-> backend '{expected}'" in SDPA.explain(*qkv)


def test_auto_falls_back_to_array_api_for_other_namespaces():
    xp = pytest.importorskip("array_api_strict")
    q = xp.ones((2, 3, 4), dtype=xp.float64)
    out, res = SDPA.fwd(q, q, q)
    assert res.backend == "array_api"


def test_import_does_not_import_optional_dependencies():
    code = (
        "import sys, arrayattn as aa\n"
        "aa.backends(); aa.get_backend()\n"
        "import numpy as np\n"
        "q = np.ones((2, 3, 4))\n"
        "with aa.use_backend('array_api'):\n"
        "    aa.scaled_dot_product_attention(q, q, q)\n"
        "print(sorted(m for m in ('cupy', 'torch', 'jax', 'numba') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, arrayattn\n"
            "print(sorted(m for m in ('cupy', 'torch', 'jax', 'numba', "
            "'numba.cuda') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # Running the reference on NumPy pulls in neither torch nor jax (numba only through its probe).
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch" not in done.stdout
    assert "jax" not in done.stdout
