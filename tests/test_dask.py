"""arrayattn.dask: any op blockwise over Dask arrays chunked along batch axes.

Results and gradients equal the op on the NumPy arrays (same backend, so to float64 rounding of a
different batch split); chunking an axis the op works across raises; shared arguments' gradients
are summed over the chunks; the graph has one op task per chunk; and a ``dask.distributed``
LocalCluster with two worker processes computes the same.
"""

from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")

import arrayattn as aa  # noqa: E402
import arrayattn.dask as aad  # noqa: E402

SDPA = aa.scaled_dot_product_attention


def _close(got, want, rtol=1e-13):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=1e-13)


def _op_tasks(arr):
    """The number of op tasks (``_run``) in an array's graph."""
    graph = dict(arr.__dask_graph__())
    return sum("_run" in str(key) for key in graph)


def _sdpa_inputs(rng):
    q = rng.standard_normal((4, 3, 6, 5))
    k = rng.standard_normal((4, 3, 7, 5))
    v = rng.standard_normal((4, 3, 7, 2))
    return q, k, v


def test_apply_sdpa_equals_numpy_and_is_lazy(rng):
    q, k, v = _sdpa_inputs(rng)
    mask = rng.random((6, 7)) > 0.3  # NumPy, broadcast: every task gets it whole
    dq = da.from_array(q, chunks=(1, 2, 6, 5))  # batch and heads both chunked
    dk = da.from_array(k, chunks=(1, 3, 7, 5))  # heads one chunk: rechunked to q's on batch axes
    dv = da.from_array(v, chunks=(2, 3, 7, 2))
    out, lse = aad.apply(SDPA, dq, dk, dv, mask=mask, causal="bottom_right", return_lse=True)
    assert isinstance(out, da.Array)
    assert out.chunks == ((1, 1, 1, 1), (2, 1), (6,), (2,))
    assert _op_tasks(out) == 8  # 4 batch chunks x 2 head chunks, nothing computed yet
    want, want_lse = SDPA(q, k, v, mask=mask, causal="bottom_right", return_lse=True)
    _close(out.compute(), want)
    _close(lse.compute(), want_lse)


def test_vjp_sdpa_with_a_broadcast_bias(rng):
    q, k, v = _sdpa_inputs(rng)
    bias = rng.standard_normal((3, 6, 7))  # shared by the batch chunks: its gradient is summed
    dq = da.from_array(q, chunks=(2, 3, 6, 5))
    out, pullback = aad.vjp(SDPA, dq, k, v, bias=bias, causal=True)
    dout = rng.standard_normal(out.shape)
    g = pullback(da.from_array(dout, chunks=(1, 3, 6, 2)))  # other chunks: rechunked to out's
    want, res = SDPA.fwd(q, k, v, bias=bias, causal=True)
    wg = SDPA.bwd(res, dout)
    _close(out.compute(), want)
    assert g.q.chunks == dq.chunks
    assert g.bias.numblocks == (1, 1, 1)
    for name in ("q", "k", "v", "bias"):
        _close(getattr(g, name).compute(), getattr(wg, name), rtol=1e-12)
    assert g._fields == ("q", "k", "v", "bias")


def test_vjp_multi_head_attention_sums_parameter_gradients(rng):
    e, heads = 6, 2
    params = {f"w_{n}": rng.standard_normal((e, e)) / e for n in "qkvo"}
    params["b_q"] = rng.standard_normal(e)
    x = rng.standard_normal((5, 4, e))
    dx = da.from_array(x, chunks=(2, 4, e))
    y, pullback = aad.vjp(aa.multi_head_attention, dx, dx, params, num_heads=heads, causal=True)
    dy = rng.standard_normal(y.shape)
    g = pullback(dy)
    want, res = aa.multi_head_attention.fwd(x, x, params, num_heads=heads, causal=True)
    wg = aa.multi_head_attention.bwd(res, dy)
    _close(y.compute(), want)
    _close(g.x_q.compute(), wg.x_q, rtol=1e-12)
    _close(g.x_kv.compute(), wg.x_kv, rtol=1e-12)
    assert sorted(g.params) == sorted(params)
    for key in params:
        assert g.params[key].numblocks == (1,) * params[key].ndim
        _close(g.params[key].compute(), wg.params[key], rtol=1e-12)


def test_vjp_merge_attention_tuples(rng):
    outs = tuple(rng.standard_normal((6, 4, 3)) for _ in range(3))
    lses = tuple(rng.standard_normal((6, 4)) for _ in range(3))
    douts = tuple(da.from_array(o, chunks=(2, 4, 3)) for o in outs)
    dlses = tuple(da.from_array(x, chunks=(2, 4)) for x in lses)
    (out, lse), pullback = aad.vjp(aa.merge_attention, douts, dlses)
    cts = (rng.standard_normal(out.shape), None)
    g = pullback(cts)
    (want, want_lse), res = aa.merge_attention.fwd(outs, lses)
    wg = aa.merge_attention.bwd(res, cts)
    _close(out.compute(), want)
    _close(lse.compute(), want_lse)
    assert isinstance(g.outs, tuple)
    assert len(g.lses) == 3
    for a, b in zip(g.outs + g.lses, wg.outs + wg.lses, strict=True):
        _close(a.compute(), b)


def test_image_op_chunks_only_the_batch_axis(rng):
    x = rng.standard_normal((4, 3, 5, 5))
    weight = rng.standard_normal((2, 3, 3, 3))
    y = aad.apply(aa.conv2d, da.from_array(x, chunks=(1, 3, 5, 5)), weight, padding=1)
    _close(y.compute(), aa.conv2d(x, weight, padding=1))
    with pytest.raises(ValueError, match=r"x: chunked along axis -3 \(size 3\), which conv2d"):
        aad.apply(aa.conv2d, da.from_array(x, chunks=(1, 1, 5, 5)), weight)


def test_chunking_an_attended_axis_raises(rng):
    q, k, v = _sdpa_inputs(rng)
    with pytest.raises(ValueError, match=r"q: chunked along axis -2 \(size 6\)"):
        aad.apply(SDPA, da.from_array(q, chunks=(4, 3, 3, 5)), k, v)
    with pytest.raises(ValueError, match=r"v: chunked along axis -1"):
        aad.apply(SDPA, q, k, da.from_array(v, chunks=(4, 3, 7, 1)))


def test_grouped_query_heads_are_not_a_batch_axis(rng):
    q = rng.standard_normal((4, 6, 5, 3))
    k = rng.standard_normal((4, 2, 5, 3))
    dq = da.from_array(q, chunks=(2, 6, 5, 3))
    out = aad.apply(SDPA, dq, k, k, enable_gqa=True)
    _close(out.compute(), SDPA(q, k, k, enable_gqa=True))
    with pytest.raises(ValueError, match="q: chunked along axis -3"):
        aad.apply(SDPA, da.from_array(q, chunks=(4, 3, 5, 3)), k, k, enable_gqa=True)


def test_undocumented_shapes_must_stay_whole(rng):
    logits = rng.standard_normal((4, 5))
    u = rng.random((4, 5))
    y = aad.apply(aa.gumbel_softmax, da.from_array(logits), u)
    _close(y.compute(), aa.gumbel_softmax(logits, u))
    with pytest.raises(ValueError, match="logits: gumbel_softmax documents no shape for logits"):
        aad.apply(aa.gumbel_softmax, da.from_array(logits, chunks=(2, 5)), u)


def test_bad_calls(rng):
    q, k, v = _sdpa_inputs(rng)
    with pytest.raises(TypeError, match="op: expected an arrayattn op"):
        aad.apply(np.add, q, k)
    out, pullback = aad.vjp(SDPA, da.from_array(q, chunks=(2, 3, 6, 5)), k, v)
    with pytest.raises(ValueError, match="cotangent of output 0: expected shape"):
        pullback(np.ones((4, 3, 6, 3)))
    with pytest.raises(TypeError, match="cotangent of output 0: expected an array"):
        pullback((np.ones(out.shape),))


@pytest.mark.slow
def test_local_cluster_with_two_worker_processes(rng):
    distributed = pytest.importorskip("distributed")
    q, k, v = _sdpa_inputs(rng)
    dq = da.from_array(q, chunks=(1, 3, 6, 5))
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out, pullback = aad.vjp(SDPA, dq, k, v, causal=True)
        dout = rng.standard_normal(out.shape)
        g = pullback(dout)
        got_out, got_q, got_k = client.compute([out, g.q, g.k], sync=True)
        workers = client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2
    want, res = SDPA.fwd(q, k, v, causal=True)
    wg = SDPA.bwd(res, dout)
    _close(got_out, want)
    _close(got_q, wg.q, rtol=1e-12)
    _close(got_k, wg.k, rtol=1e-12)


def _chunk_batch(op, name, value, whole=False):
    """Example value as Dask: arrays with a documented batch axis chunked by 1 along axis 0."""
    from arrayattn.dask import _legends

    if isinstance(value, tuple):
        return tuple(_chunk_batch(op, name, v, whole) for v in value)
    if not isinstance(value, np.ndarray):
        return value
    legend = _legends(op).get(name)
    if not whole and legend is not None and legend.core is not None and value.ndim > legend.core:
        return da.from_array(value, chunks=(1,) + value.shape[1:])
    return da.from_array(value, chunks=value.shape)


@pytest.mark.parametrize("name", sorted(aa.registered_ops()))
def test_every_op_blockwise_equals_numpy(name):
    """Any registered op: its examples over Dask arrays (batch axes chunked by 1 where the op
    documents them; every array one chunk where it documents no shape for one) give the NumPy
    results."""
    import inspect

    from arrayattn.dask import _legends

    op = aa.registered_ops()[name]
    for args, kwargs in op.examples(np.random.default_rng(5)):
        bound = inspect.signature(op).bind(*args, **kwargs)
        undocumented = [
            k
            for k, v in bound.arguments.items()
            if isinstance(v, (np.ndarray, tuple)) and _legends(op).get(k) is None
        ]
        dargs = {
            k: _chunk_batch(op, k, v, whole=bool(undocumented)) for k, v in bound.arguments.items()
        }
        want = op(**bound.arguments)
        got = aad.apply(op, **dargs)
        got = da.compute(*got) if isinstance(got, tuple) else (got.compute(),)
        for a, b in zip(got, want if isinstance(want, tuple) else (want,), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(aad, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
