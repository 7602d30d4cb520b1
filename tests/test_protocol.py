"""The op protocol: fwd/bwd/vjp, Grads records, Residuals (flat, nested, rebuilt), cotangent
checks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import arrayattn as aa
from support import to_numpy, to_xp

SDPA = aa.scaled_dot_product_attention
MHA = aa.multi_head_attention


@pytest.fixture
def qkv(rng):
    return (
        rng.standard_normal((2, 2, 4, 3)),
        rng.standard_normal((2, 2, 5, 3)),
        rng.standard_normal((2, 2, 5, 2)),
    )


@pytest.fixture
def mha_call(rng):
    e, heads = 4, 2
    params = {f"w_{c}": rng.standard_normal((e, e)) / 2 for c in "qkvo"}
    params["b_o"] = rng.standard_normal(e)
    return (rng.standard_normal((2, 3, e)), rng.standard_normal((2, 5, e)), params), {
        "num_heads": heads
    }


def test_ops_are_registered_objects():
    ops = aa.registered_ops()
    assert ops["scaled_dot_product_attention"] is SDPA
    assert ops["multi_head_attention"] is MHA
    assert isinstance(SDPA, aa.Op)
    assert SDPA.name == "scaled_dot_product_attention"
    assert SDPA.__doc__
    assert "Parameters" in SDPA.__doc__
    assert repr(SDPA) == "<arrayattn op scaled_dot_product_attention>"
    assert pickle.loads(pickle.dumps(SDPA)) is SDPA
    assert SDPA.differentiable == ("q", "k", "v", "bias")
    assert MHA.differentiable == ("x_q", "x_kv", "params")


def test_grads_record(qkv, rng):
    q, k, v = qkv
    out, res = SDPA.fwd(q, k, v)
    g = SDPA.bwd(res, np.ones_like(out))
    assert isinstance(g, tuple)
    assert type(g).__name__ == "ScaledDotProductAttentionGrads"
    assert g._fields == ("q", "k", "v", "bias")
    assert g.bias is None
    assert g[3] is None
    assert (g.q.shape, g.k.shape, g.v.shape) == (q.shape, k.shape, v.shape)
    bias = rng.standard_normal((2, 1, 5))
    out, res = SDPA.fwd(q, k, v, bias=bias, mask=np.ones((4, 5), bool))
    g = SDPA.bwd(res, np.ones_like(out))
    assert g.bias.shape == bias.shape
    assert g.bias.dtype == bias.dtype
    assert "mask" not in g._fields  # masks are not differentiable
    q2, k2, v2 = q, k[:, :1], v[:, :1]
    out, res = SDPA.fwd(q2, k2, v2, enable_gqa=True)
    g = SDPA.bwd(res, np.ones_like(out))
    assert g.k.shape == k2.shape
    assert g.v.shape == v2.shape


def test_mha_grads_params_dict(mha_call):
    args, kw = mha_call
    y, res = MHA.fwd(*args, **kw)
    g = MHA.bwd(res, np.ones_like(y))
    assert g._fields == ("x_q", "x_kv", "params")
    assert isinstance(g.params, dict)
    assert set(g.params) == set(args[2])
    for key, val in args[2].items():
        assert g.params[key].shape == val.shape


def test_vjp_equals_fwd_then_bwd(qkv, rng):
    q, k, v = qkv
    kw = dict(causal="bottom_right", bias=rng.standard_normal((5,)), return_lse=True)
    (out, lse), res = SDPA.fwd(q, k, v, **kw)
    (out2, lse2), pullback = aa.vjp(SDPA, q, k, v, **kw)
    assert out.tobytes() == out2.tobytes()
    assert lse.tobytes() == lse2.tobytes()
    cts = (rng.standard_normal(out.shape), rng.standard_normal(lse.shape))
    for a, b in zip(SDPA.bwd(res, cts), pullback(cts), strict=True):
        assert a.tobytes() == b.tobytes()
    # the plain call is the first output of fwd, bit for bit
    out3, lse3 = SDPA(q, k, v, **kw)
    assert out3.tobytes() == out.tobytes()
    assert lse3.tobytes() == lse.tobytes()


def test_vjp_mha(mha_call, rng):
    args, kw = mha_call
    y, res = MHA.fwd(*args, **kw)
    y2, pullback = aa.vjp(MHA, *args, **kw)
    assert y.tobytes() == y2.tobytes()
    dy = rng.standard_normal(y.shape)
    g, g2 = MHA.bwd(res, dy), pullback(dy)
    assert g.x_q.tobytes() == g2.x_q.tobytes()
    assert all(g.params[key].tobytes() == g2.params[key].tobytes() for key in g.params)


def test_vjp_rejects_non_ops(qkv):
    with pytest.raises(TypeError, match="op"):
        aa.vjp(lambda q: q, *qkv)


def test_none_cotangents_for_unused_outputs(qkv, rng):
    q, k, v = qkv
    (out, lse), res = SDPA.fwd(q, k, v, return_lse=True)
    do, dlse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    full = SDPA.bwd(res, (do, np.zeros_like(lse)))
    only_out = SDPA.bwd(res, (do, None))
    for a, b in zip(full, only_out, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    only_lse = SDPA.bwd(res, (None, dlse))
    assert np.all(only_lse.v == 0)
    assert np.any(only_lse.q != 0)
    both = SDPA.bwd(res, (do, dlse))
    for a, b, c in zip(both, only_out, only_lse, strict=True):
        if a is not None:
            np.testing.assert_allclose(a, b + c, rtol=1e-12, atol=1e-14)
    # a list is accepted like a tuple
    np.testing.assert_array_equal(SDPA.bwd(res, [do, dlse]).q, both.q)


def test_residuals_record(qkv, rng):
    q, k, v = qkv
    mask = rng.random((4, 5)) > 0.2
    out, res = SDPA.fwd(q, k, v, mask=mask, causal=True, scale=0.3)
    assert isinstance(res, aa.Residuals)
    assert res.op == "scaled_dot_product_attention"
    assert res.backend in ("array_api", "numba")
    # a flat record of arrays (None for absent ones) plus hashable static options
    for key, val in res.arrays.items():
        assert "/" not in key
        assert val is None or hasattr(val, "shape")
    hash(res.skeleton)
    opts = res.options
    assert opts.scale == 0.3
    assert opts.causal == "top_left"
    assert opts.return_lse is False
    assert res.outputs == (("out", out.shape, out.dtype),)
    # never the Lq x Lk probabilities: only the caller's mask reaches that size
    big = [
        key
        for key, val in res.arrays.items()
        if val is not None and val.shape[-2:] == (4, 5) and key != "mask"
    ]
    assert big == []
    lse = res.arrays["lse"]
    assert lse.shape == (2, 2, 4)
    assert lse.dtype == np.float64


def test_residuals_with_arrays_round_trip(qkv, rng):
    q, k, v = qkv
    bias = rng.standard_normal((2, 4, 5))
    (out, lse), res = SDPA.fwd(q, k, v, bias=bias, causal="bottom_right", return_lse=True)
    cts = (rng.standard_normal(out.shape), rng.standard_normal(lse.shape))
    g = SDPA.bwd(res, cts)
    copies = {key: None if a is None else a.copy() for key, a in res.arrays.items()}
    rebuilt = res.with_arrays(copies)
    assert rebuilt.arrays is not res.arrays
    assert rebuilt.static == res.static
    for a, b in zip(SDPA.bwd(rebuilt, cts), g, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="arrays"):
        res.with_arrays({key: a for key, a in copies.items() if key != "lse"})
    with pytest.raises(ValueError, match="arrays"):
        res.with_arrays({**copies, "extra": np.ones(1)})


def test_residuals_with_arrays_through_another_namespace(qkv):
    """An adapter saves the arrays as its own tensors: rebuild with torch tensors of the same
    values."""
    torch = pytest.importorskip("torch")
    q, k, v = qkv
    with aa.use_backend("array_api"):
        tq, tk, tv = (torch.asarray(a) for a in qkv)
        out, res = SDPA.fwd(tq, tk, tv, causal=True)
        g = SDPA.bwd(res, torch.ones_like(out))
        saved = {key: None if a is None else a.clone() for key, a in res.arrays.items()}
        g2 = SDPA.bwd(res.with_arrays(saved), torch.ones_like(out))
    for a, b in zip(g, g2, strict=True):
        if a is not None:
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_mha_nested_residuals_round_trip(mha_call, rng):
    args, kw = mha_call
    y, res = MHA.fwd(*args, **kw, causal=True)
    inner = {key for key in res.arrays if key.startswith("attn/")}
    assert {"attn/q", "attn/k", "attn/v", "attn/out", "attn/lse", "attn/mask", "attn/bias"} <= inner
    inner_record = dict(res.nested)["attn"]
    assert inner_record.op == "scaled_dot_product_attention"
    assert inner_record.options.causal == "top_left"
    assert res.inner("attn").arrays.keys() == {key[len("attn/") :] for key in inner}
    dy = rng.standard_normal(y.shape)
    g = MHA.bwd(res, dy)
    copies = {key: None if a is None else np.array(a, copy=True) for key, a in res.arrays.items()}
    g2 = MHA.bwd(res.with_arrays(copies), dy)
    np.testing.assert_array_equal(g.x_q, g2.x_q)
    np.testing.assert_array_equal(g.x_kv, g2.x_kv)
    for key in g.params:
        np.testing.assert_array_equal(g.params[key], g2.params[key])


def test_backward_runs_on_the_forward_backend(qkv):
    """Backward follows res.backend, whatever the setting is when bwd is called."""
    q, k, v = qkv
    with aa.use_backend("array_api"):
        out, res = SDPA.fwd(q, k, v)
    assert res.backend == "array_api"
    with aa.use_backend("cupy"):  # cannot run anything here: bwd must not consult it
        g = SDPA.bwd(res, np.ones_like(out))
    assert g.q.shape == q.shape


# -- bad cotangents and residuals ----------------------------------------------------------------


def test_cotangent_checks_single_output(qkv):
    q, k, v = qkv
    out, res = SDPA.fwd(q, k, v)
    with pytest.raises(TypeError, match="cotangents.*one output.*tuple"):
        SDPA.bwd(res, (np.ones_like(out),))
    with pytest.raises(TypeError, match="cotangents.*NoneType"):
        SDPA.bwd(res, None)
    with pytest.raises(TypeError, match="cotangent of out: expected an array, got list"):
        SDPA.bwd(res, np.ones_like(out).tolist())
    with pytest.raises(ValueError, match=r"cotangent of out: expected shape \(2, 2, 4, 2\)"):
        SDPA.bwd(res, np.ones((2, 2, 4, 3)))
    with pytest.raises(ValueError, match="cotangent of out.*shape"):
        SDPA.bwd(res, np.ones((2, 4, 2)))  # would broadcast; must not
    with pytest.raises(TypeError, match="cotangent of out: expected dtype float64, got float32"):
        SDPA.bwd(res, np.ones_like(out, dtype=np.float32))


def test_cotangent_checks_two_outputs(qkv):
    q, k, v = qkv
    (out, lse), res = SDPA.fwd(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match="cotangents.*2 outputs.*out, lse"):
        SDPA.bwd(res, np.ones_like(out))
    with pytest.raises(TypeError, match="cotangents.*2 outputs"):
        SDPA.bwd(res, (np.ones_like(out),))
    with pytest.raises(TypeError, match="cotangents.*2 outputs"):
        SDPA.bwd(res, (np.ones_like(out), None, None))
    with pytest.raises(ValueError, match="cotangent of lse.*shape"):
        SDPA.bwd(res, (np.ones_like(out), np.ones((2, 2, 5))))
    with pytest.raises(TypeError, match="cotangent of lse.*dtype"):
        SDPA.bwd(res, (None, np.ones(lse.shape, dtype=np.float32)))


def test_cotangent_of_another_namespace(qkv):
    torch = pytest.importorskip("torch")
    q, k, v = qkv
    out, res = SDPA.fwd(q, k, v)
    with pytest.raises((TypeError, ValueError), match="cotangent"):
        SDPA.bwd(res, torch.ones(tuple(out.shape), dtype=torch.float64))


def test_residuals_of_another_op(qkv, mha_call):
    q, k, v = qkv
    args, kw = mha_call
    y, mha_res = MHA.fwd(*args, **kw)
    out, sdpa_res = SDPA.fwd(q, k, v)
    with pytest.raises(
        TypeError,
        match="res: expected the Residuals of scaled_dot_product_attention, "
        "got multi_head_attention",
    ):
        SDPA.bwd(mha_res, np.ones_like(out))
    with pytest.raises(TypeError, match="res.*multi_head_attention.*scaled_dot_product_attention"):
        MHA.bwd(sdpa_res, np.ones_like(y))
    with pytest.raises(TypeError, match="res.*dict"):
        SDPA.bwd(dict(sdpa_res.arrays), np.ones_like(out))
    with pytest.raises(TypeError, match="res"):
        SDPA.bwd(None, np.ones_like(out))


def test_explain_names_the_backend(qkv):
    q, k, v = qkv
    with aa.use_backend("array_api"):
        text = SDPA.explain(q, k, v, causal=True)
    assert "scaled_dot_product_attention" in text
    assert "'array_api'" in text
    for name in ("cupy", "numba_cuda", "numba", "array_api"):
        assert f"  {name}:" in text
    with aa.use_backend("cupy"):
        text = SDPA.explain(q, k, v)
    assert "no backend can run" in text
    assert "cupy:" in text
    # explain validates like a call
    with pytest.raises(ValueError, match="causal"):
        SDPA.explain(q, k, v, causal="diagonal")


@pytest.mark.parametrize("namespace", ["array_api_strict", "torch"])
def test_protocol_on_other_namespaces(namespace, qkv):
    from support import load_namespace

    xp = load_namespace(namespace)
    q, k, v = (to_xp(xp, a) for a in qkv)
    out, pullback = aa.vjp(SDPA, q, k, v, causal=True)
    g = pullback(xp.ones(out.shape, dtype=out.dtype))
    assert g.bias is None
    ref = SDPA.bwd(SDPA.fwd(*qkv, causal=True)[1], np.ones(tuple(out.shape)))
    for a, b in zip(g[:3], ref[:3], strict=True):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-12, atol=1e-14)


def test_outputs_and_gradients_are_arrays_never_numpy_scalars():
    """NumPy full reductions give np.float64 scalars; every op returns 0-d arrays instead."""
    rng = np.random.default_rng(3)
    for op in aa.registered_ops().values():
        for args, kwargs in op.examples(rng):
            out, res = op.fwd(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            cts = tuple(np.ones_like(o) for o in outs)
            grads = op.bwd(res, cts if isinstance(out, tuple) else cts[0])
            leaves = list(outs)
            for g in grads:
                if isinstance(g, dict):
                    leaves.extend(g.values())
                else:
                    leaves.extend(g if isinstance(g, tuple) else [g])
            for leaf in leaves:
                assert leaf is None or isinstance(leaf, np.ndarray), (op.name, type(leaf))
