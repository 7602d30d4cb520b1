"""multi_head_attention: a NumPy re-implementation of torch.nn.MultiheadAttention, torch itself,
FD."""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import numerical_gradient
from support import (
    assert_close_rel,
    causal_keep,
    directional_check,
    require_kernel,
    to_numpy,
    to_xp,
)

MHA = aa.multi_head_attention
SDPA = aa.scaled_dot_product_attention


@pytest.fixture(params=["array_api", "numba"])
def attn_backend(request):
    """The backend setting. multi_head_attention is composite: under "numba" its projections run
    as array-API code on NumPy and its attention core on numba's SDPA kernel."""
    name = request.param
    if name != "array_api":
        require_kernel(SDPA, name)
    with aa.use_backend(name):
        yield name


def core_backend(res):
    """The backend that ran the nested attention core of an MHA residual."""
    return dict(res.nested)["attn"].backend


def make_params(rng, e, ekv, heads, dh, dv, eo, biases=True, scale=0.5):
    p = {
        "w_q": rng.standard_normal((heads * dh, e)) * scale,
        "w_k": rng.standard_normal((heads * dh, ekv)) * scale,
        "w_v": rng.standard_normal((heads * dv, ekv)) * scale,
        "w_o": rng.standard_normal((eo, heads * dv)) * scale,
    }
    if biases is True:
        biases = ("b_q", "b_k", "b_v", "b_o")
    for b in biases or ():
        p[b] = rng.standard_normal(p["w" + b[1:]].shape[0])
    return p


def mha_oracle(x_q, x_kv, p, heads, keep=None, causal=False):
    """torch.nn.MultiheadAttention's math (batch_first), in float64, from its documentation:
    in-projections ``x Wᵀ + b``, heads as contiguous column blocks, softmax(q kᵀ/sqrt(dh)), concat,
    out-projection. ``keep`` is a keep-mask (True = may attend) broadcastable to (N, h, Lq, Lk)."""

    def lin(x, w, b):
        return x @ w.T + (0 if b is None else b)

    def split(x):
        n, length, width = x.shape
        return x.reshape(n, length, heads, width // heads).transpose(0, 2, 1, 3)

    q = split(lin(x_q, p["w_q"], p.get("b_q")))
    k = split(lin(x_kv, p["w_k"], p.get("b_k")))
    v = split(lin(x_kv, p["w_v"], p.get("b_v")))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    allowed = np.ones(s.shape, dtype=bool)
    if keep is not None:
        allowed &= keep
    band = causal_keep(q.shape[-2], k.shape[-2], causal)
    if band is not None:
        allowed &= band
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    att = e / e.sum(-1, keepdims=True)
    o = (att @ v).transpose(0, 2, 1, 3).reshape(x_q.shape[0], x_q.shape[1], -1)
    return lin(o, p["w_o"], p.get("b_o"))


CASES = {
    "self_biases": dict(n=2, lq=4, lk=4, e=6, ekv=6, heads=2, dh=3, dv=3, eo=6),
    "cross_kdim": dict(n=2, lq=3, lk=5, e=6, ekv=4, heads=3, dh=2, dv=2, eo=6),
    "uneven_widths": dict(n=1, lq=3, lk=4, e=5, ekv=3, heads=2, dh=2, dv=3, eo=4),
    "no_bias": dict(n=2, lq=3, lk=4, e=4, ekv=4, heads=2, dh=2, dv=2, eo=4, biases=()),
    "some_bias": dict(
        n=2, lq=3, lk=4, e=4, ekv=4, heads=1, dh=4, dv=2, eo=3, biases=("b_v", "b_o")
    ),
}


def build(case, rng):
    c = dict(CASES[case])
    n, lq, lk, heads = c.pop("n"), c.pop("lq"), c.pop("lk"), c.pop("heads")
    x_q = rng.standard_normal((n, lq, c["e"]))
    x_kv = rng.standard_normal((n, lk, c["ekv"]))
    return x_q, x_kv, make_params(rng, heads=heads, **c), heads


MASKS = {
    "none": None,
    "lq_lk": lambda n, h, lq, lk: (lq, lk),
    "n1_lq_lk": lambda n, h, lq, lk: (n, 1, lq, lk),
    "1h1lk": lambda n, h, lq, lk: (1, h, 1, lk),
    "lk": lambda n, h, lq, lk: (lk,),
}


def _mask(name, rng, n, h, lq, lk):
    if MASKS[name] is None:
        return None
    m = rng.random(MASKS[name](n, h, lq, lk)) > 0.3
    m[..., 0] = True  # every row keeps key 0: torch's NaN for empty rows stays out of the way
    return m


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_numpy_mha(attn_backend, case, mask, causal, rng):
    x_q, x_kv, p, heads = build(case, rng)
    keep = _mask(mask, rng, x_q.shape[0], heads, x_q.shape[1], x_kv.shape[1])
    y = MHA(x_q, x_kv, p, num_heads=heads, mask=keep, causal=causal)
    want = mha_oracle(x_q, x_kv, p, heads, keep, causal)
    assert y.shape == want.shape
    assert y.dtype == x_q.dtype
    assert_close_rel(y, want, 1e-12)


def _grads_by_fd(x_q, x_kv, p, heads, dy, **kw):
    def f_of(which, key=None):
        def f(x):
            args = {"x_q": x_q, "x_kv": x_kv, "params": dict(p)}
            if key is None:
                args[which] = x
            else:
                args["params"][key] = x
            return float(
                np.sum(MHA(args["x_q"], args["x_kv"], args["params"], num_heads=heads, **kw) * dy)
            )

        return f

    fd = {
        "x_q": numerical_gradient(f_of("x_q"), x_q),
        "x_kv": numerical_gradient(f_of("x_kv"), x_kv),
    }
    fd["params"] = {key: numerical_gradient(f_of("params", key), val) for key, val in p.items()}
    return fd


@pytest.mark.parametrize(
    ("case", "mask", "causal"),
    [
        ("self_biases", "none", False),
        ("cross_kdim", "1h1lk", True),
        ("uneven_widths", "n1_lq_lk", "bottom_right"),
        ("no_bias", "lk", False),
        ("some_bias", "lq_lk", True),
    ],
)
def test_gradients_match_finite_differences(attn_backend, case, mask, causal, rng):
    x_q, x_kv, p, heads = build(case, rng)
    keep = _mask(mask, rng, x_q.shape[0], heads, x_q.shape[1], x_kv.shape[1])
    y, res = MHA.fwd(x_q, x_kv, p, num_heads=heads, mask=keep, causal=causal)
    assert core_backend(res) == attn_backend
    if attn_backend != "array_api":
        # Dot-product test per parameter (two calls each): the kernel's per-call cost makes
        # entry-by-entry differences slow; entries are pinned by the array_api run below.
        errors = directional_check(
            MHA, (x_q, x_kv, p), dict(num_heads=heads, mask=keep, causal=causal), rng
        )
        assert len(errors) == 2 + len(p)
        with aa.use_backend("array_api"):
            y_ref, res_ref = MHA.fwd(x_q, x_kv, p, num_heads=heads, mask=keep, causal=causal)
        dy = rng.standard_normal(y.shape)
        g, g_ref = MHA.bwd(res, dy), MHA.bwd(res_ref, dy)
        assert_close_rel(y, y_ref, 1e-10, "y")
        for name in ("x_q", "x_kv"):
            assert_close_rel(getattr(g, name), getattr(g_ref, name), 1e-10, name, floor=1.0)
        for key in p:
            assert_close_rel(g.params[key], g_ref.params[key], 1e-10, key, floor=1.0)
        return
    dy = rng.standard_normal(y.shape)
    g = MHA.bwd(res, dy)
    assert type(g).__name__ == "MultiHeadAttentionGrads"
    assert set(g.params) == set(p)
    fd = _grads_by_fd(x_q, x_kv, p, heads, dy, mask=keep, causal=causal)
    pairs = [("x_q", g.x_q, fd["x_q"]), ("x_kv", g.x_kv, fd["x_kv"])]
    pairs += [(f"params[{key}]", g.params[key], fd["params"][key]) for key in p]
    for name, got, want in pairs:
        assert got.shape == want.shape, name
        # The floor 1 is the problem's scale: the key bias's gradient is 0 in exact arithmetic
        # (softmax is shift invariant), and its differences are rounding noise of ~1e-9.
        err = np.max(np.abs(got - want))
        assert err <= 1e-6 * max(np.max(np.abs(want)), 1.0), (name, err)


def test_fully_masked_rows_give_zero_attention(rng):
    """A query row that may attend to nothing: its attention output is 0, so y = b_o, and no NaN."""
    x_q, x_kv, p, heads = build("cross_kdim", rng)
    keep = np.ones((x_q.shape[1], x_kv.shape[1]), dtype=bool)
    keep[1] = False
    y, res = MHA.fwd(x_q, x_kv, p, num_heads=heads, mask=keep)
    g = MHA.bwd(res, np.ones_like(y))
    np.testing.assert_array_equal(y[:, 1], np.broadcast_to(p["b_o"], y[:, 1].shape))
    np.testing.assert_array_equal(g.x_q[:, 1], 0.0)
    assert not any(np.isnan(a).any() for a in (y, g.x_q, g.x_kv, *g.params.values()))


# -- against torch.nn.MultiheadAttention ----------------------------------------------------------


@pytest.mark.parametrize("kdim", [None, 4])
@pytest.mark.parametrize("mask", ["none", "lq_lk", "causal"])
def test_matches_torch_multihead_attention(kdim, mask, rng):
    torch = pytest.importorskip("torch")
    n, lq, lk, e, heads = 2, 5, 6, 6, 3
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(
        e, heads, batch_first=True, bias=True, kdim=kdim, vdim=kdim, dtype=torch.float64
    )
    with torch.no_grad():  # non-zero biases, so their gradients mean something
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    if kdim is None:
        w_q, w_k, w_v = module.in_proj_weight.detach().chunk(3)
    else:
        w_q, w_k, w_v = (getattr(module, f"{c}_proj_weight").detach() for c in "qkv")
    b_q, b_k, b_v = module.in_proj_bias.detach().chunk(3)
    params = {
        "w_q": w_q,
        "w_k": w_k,
        "w_v": w_v,
        "w_o": module.out_proj.weight.detach(),
        "b_q": b_q,
        "b_k": b_k,
        "b_v": b_v,
        "b_o": module.out_proj.bias.detach(),
    }
    params = {key: val.numpy().copy() for key, val in params.items()}
    x_q = rng.standard_normal((n, lq, e))
    x_kv = rng.standard_normal((n, lk, kdim or e))
    keep, causal, torch_mask = None, False, None
    if mask == "lq_lk":
        keep = rng.random((lq, lk)) > 0.3
        keep[:, 0] = True
        torch_mask = torch.asarray(~keep)  # nn.MultiheadAttention: True = may NOT attend
    elif mask == "causal":
        causal = True
        torch_mask = torch.asarray(~causal_keep(lq, lk, True))

    tq = torch.asarray(x_q).requires_grad_(True)
    tkv = torch.asarray(x_kv).requires_grad_(True)
    y_t, _ = module(tq, tkv, tkv, attn_mask=torch_mask, need_weights=False)
    dy = rng.standard_normal(y_t.shape)
    y_t.backward(torch.asarray(dy))

    y, res = MHA.fwd(x_q, x_kv, params, num_heads=heads, mask=keep, causal=causal)
    g = MHA.bwd(res, dy)
    assert_close_rel(y, y_t.detach().numpy(), 1e-12, "y")
    assert_close_rel(g.x_q, tq.grad.numpy(), 1e-12, "x_q")
    assert_close_rel(g.x_kv, tkv.grad.numpy(), 1e-12, "x_kv")
    if kdim is None:
        torch_w = dict(zip(("w_q", "w_k", "w_v"), module.in_proj_weight.grad.chunk(3), strict=True))
    else:
        torch_w = {f"w_{c}": getattr(module, f"{c}_proj_weight").grad for c in "qkv"}
    torch_grads = {
        **torch_w,
        "w_o": module.out_proj.weight.grad,
        **dict(zip(("b_q", "b_k", "b_v"), module.in_proj_bias.grad.chunk(3), strict=True)),
        "b_o": module.out_proj.bias.grad,
    }
    assert set(g.params) == set(torch_grads)
    for key, want in torch_grads.items():
        assert_close_rel(g.params[key], want.numpy(), 1e-12, key, floor=1.0)
    # and the NumPy re-implementation agrees with torch too
    assert_close_rel(
        mha_oracle(x_q, x_kv, params, heads, keep, causal), y_t.detach().numpy(), 1e-12
    )


def test_torch_tensors_through_array_api(rng):
    """The same op on torch CPU tensors (array-API path) equals the NumPy run."""
    torch = pytest.importorskip("torch")
    x_q, x_kv, p, heads = build("cross_kdim", rng)
    keep = _mask("1h1lk", rng, x_q.shape[0], heads, x_q.shape[1], x_kv.shape[1])
    y, res = MHA.fwd(x_q, x_kv, p, num_heads=heads, mask=keep, causal=True)
    dy = rng.standard_normal(y.shape)
    g = MHA.bwd(res, dy)
    t = lambda a: torch.asarray(a)  # noqa: E731
    with aa.use_backend("array_api"):
        yt, rest = MHA.fwd(
            t(x_q),
            t(x_kv),
            {k_: t(a) for k_, a in p.items()},
            num_heads=heads,
            mask=t(keep),
            causal=True,
        )
        gt = MHA.bwd(rest, t(dy))
    assert isinstance(yt, torch.Tensor)
    assert_close_rel(to_numpy(yt), y, 1e-12)
    assert_close_rel(to_numpy(gt.x_q), g.x_q, 1e-12)
    assert_close_rel(to_numpy(gt.x_kv), g.x_kv, 1e-12)
    for key in p:
        assert_close_rel(to_numpy(gt.params[key]), g.params[key], 1e-12, key, floor=1.0)


def test_array_api_strict(rng):
    xp = pytest.importorskip("array_api_strict")
    x_q, x_kv, p, heads = build("some_bias", rng)
    with aa.use_backend("array_api"):
        y, res = MHA.fwd(to_xp(xp, x_q), to_xp(xp, x_kv), to_xp(xp, p), num_heads=heads)
        g = MHA.bwd(res, to_xp(xp, np.ones(y.shape)))
    assert_close_rel(to_numpy(y), mha_oracle(x_q, x_kv, p, heads), 1e-12)
    assert set(g.params) == set(p)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_dtypes(dtype, rng):
    x_q, x_kv, p, heads = build("cross_kdim", rng)
    cast = lambda a: a.astype(dtype)  # noqa: E731
    y, res = MHA.fwd(cast(x_q), cast(x_kv), {k_: cast(a) for k_, a in p.items()}, num_heads=heads)
    g = MHA.bwd(res, np.ones(y.shape, dtype))
    assert y.dtype == dtype
    assert g.x_q.dtype == dtype
    assert g.x_kv.dtype == dtype
    assert all(a.dtype == dtype for a in g.params.values())
    want = mha_oracle(
        *(a.astype(np.float64) for a in (cast(x_q), cast(x_kv))),
        {k_: cast(a).astype(np.float64) for k_, a in p.items()},
        heads,
    )
    assert_close_rel(y, want, {np.float32: 1e-5, np.float16: 5e-3}[dtype])


# -- protocol details, memory, validation ----------------------------------------------------------


def test_residuals_nest_the_attention_record_and_rebuild(rng):
    x_q, x_kv, p, heads = build("cross_kdim", rng)
    y, res = MHA.fwd(x_q, x_kv, p, num_heads=heads, causal=True)
    assert {"attn/q", "attn/k", "attn/v", "attn/out", "attn/lse"} <= set(res.arrays)
    assert all("/" not in key or key.startswith("attn/") for key in res.arrays)
    assert "attn" in dict(res.nested)
    dy = rng.standard_normal(y.shape)
    g = MHA.bwd(res, dy)
    # What a framework adapter does: save the arrays, rebuild the record from its own copies.
    copies = {key: None if a is None else np.array(a, copy=True) for key, a in res.arrays.items()}
    g2 = MHA.bwd(res.with_arrays(copies), dy)
    np.testing.assert_array_equal(g2.x_q, g.x_q)
    np.testing.assert_array_equal(g2.x_kv, g.x_kv)
    for key in p:
        np.testing.assert_array_equal(g2.params[key], g.params[key])
    # The rebuilt record really uses the new arrays: changed saved inputs change the gradients.
    changed = dict(copies, **{"attn/v": copies["attn/v"] * 2})
    g3 = MHA.bwd(res.with_arrays(changed), dy)
    assert not np.allclose(g3.x_kv, g.x_kv)


def test_readonly_inputs_and_no_aliasing(rng):
    x_q, x_kv, p, heads = build("self_biases", rng)
    keep = _mask("lq_lk", rng, 2, heads, 4, 4)
    inputs = {"x_q": x_q, "x_kv": x_kv, "mask": keep, **p}
    copies = {key: a.copy() for key, a in inputs.items()}
    for a in inputs.values():
        a.flags.writeable = False
    y, res = MHA.fwd(x_q, x_kv, p, num_heads=heads, mask=keep)
    g = MHA.bwd(res, np.ones_like(y))
    for key, a in inputs.items():
        np.testing.assert_array_equal(a, copies[key], err_msg=key)
    for produced in (y, g.x_q, g.x_kv, *g.params.values()):
        for key, a in inputs.items():
            assert not np.shares_memory(produced, a), key


def test_self_attention_same_array(rng):
    """x_kv is x_q: its gradient is the sum of both paths (checked by FD on the shared input)."""
    x, _, p, heads = build("self_biases", rng)
    with aa.use_backend("array_api"):
        y, res = MHA.fwd(x, x, p, num_heads=heads, causal=True)
        dy = rng.standard_normal(y.shape)
        g = MHA.bwd(res, dy)
        fd = numerical_gradient(
            lambda z: float(np.sum(MHA(z, z, p, num_heads=heads, causal=True) * dy)), x
        )
    assert np.max(np.abs(g.x_q + g.x_kv - fd)) <= 1e-6 * np.max(np.abs(fd))


def test_deterministic(rng):
    x_q, x_kv, p, heads = build("cross_kdim", rng)
    runs = []
    for _ in range(2):
        y, res = MHA.fwd(x_q, x_kv, p, num_heads=heads, causal=True)
        g = MHA.bwd(res, np.ones_like(y))
        runs.append([y, g.x_q, g.x_kv, *(g.params[key] for key in sorted(p))])
    for a, b in zip(*runs, strict=True):
        assert a.tobytes() == b.tobytes()


def _bad(rng):
    x_q, x_kv, p, heads = build("cross_kdim", rng)  # E=6, Ekv=4, heads=3, dh=dv=2
    return x_q, x_kv, p


BAD = [
    (
        "params not a mapping",
        lambda x_q, x_kv, p: ((x_q, x_kv, list(p.values())), {}),
        TypeError,
        ["params", "list"],
    ),
    (
        "missing weight",
        lambda x_q, x_kv, p: ((x_q, x_kv, {k: v for k, v in p.items() if k != "w_k"}), {}),
        ValueError,
        ["params", "w_k"],
    ),
    (
        "unknown key",
        lambda x_q, x_kv, p: ((x_q, x_kv, {**p, "w_x": p["w_q"]}), {}),
        ValueError,
        ["params", "w_x"],
    ),
    (
        "weight wrong shape",
        lambda x_q, x_kv, p: ((x_q, x_kv, {**p, "w_k": p["w_k"][:, :3]}), {}),
        ValueError,
        ["w_k", "(6, 3)"],
    ),
    (
        "bias wrong shape",
        lambda x_q, x_kv, p: ((x_q, x_kv, {**p, "b_o": p["b_o"][:2]}), {}),
        ValueError,
        ["b_o", "(2,)"],
    ),
    (
        "weight not 2-D",
        lambda x_q, x_kv, p: ((x_q, x_kv, {**p, "w_o": p["w_o"][0]}), {}),
        ValueError,
        ["w_o"],
    ),
    (
        "param not an array",
        lambda x_q, x_kv, p: ((x_q, x_kv, {**p, "b_q": [0.0] * 6}), {}),
        TypeError,
        ["b_q"],
    ),
    (
        "param dtype",
        lambda x_q, x_kv, p: ((x_q, x_kv, {**p, "w_q": p["w_q"].astype(np.float32)}), {}),
        TypeError,
        ["w_q", "float32"],
    ),
    ("x_q int", lambda x_q, x_kv, p: ((x_q.astype(int), x_kv, p), {}), TypeError, ["x_q"]),
    ("x_q rank", lambda x_q, x_kv, p: ((x_q[0], x_kv, p), {}), ValueError, ["x_q", "(N, Lq, E)"]),
    ("x_kv rank", lambda x_q, x_kv, p: ((x_q, x_kv[None], p), {}), ValueError, ["x_kv"]),
    (
        "batch mismatch",
        lambda x_q, x_kv, p: ((x_q, x_kv[:1], p), {}),
        ValueError,
        ["x_kv", "N = 2"],
    ),
    ("x_kv width", lambda x_q, x_kv, p: ((x_q, x_kv[..., :3], p), {}), ValueError, ["w_k"]),
    (
        "heads do not divide",
        lambda x_q, x_kv, p: ((x_q, x_kv, p), {"num_heads": 4}),
        ValueError,
        ["w_q", "num_heads"],
    ),
    (
        "num_heads zero",
        lambda x_q, x_kv, p: ((x_q, x_kv, p), {"num_heads": 0}),
        ValueError,
        ["num_heads", "0"],
    ),
    (
        "num_heads float",
        lambda x_q, x_kv, p: ((x_q, x_kv, p), {"num_heads": 3.0}),
        TypeError,
        ["num_heads", "float"],
    ),
    (
        "num_heads bool",
        lambda x_q, x_kv, p: ((x_q, x_kv, p), {"num_heads": True}),
        TypeError,
        ["num_heads", "bool"],
    ),
    (
        "mask not bool",
        lambda x_q, x_kv, p: ((x_q, x_kv, p), {"mask": np.ones((3, 5))}),
        TypeError,
        ["mask"],
    ),
    (
        "mask shape",
        lambda x_q, x_kv, p: ((x_q, x_kv, p), {"mask": np.ones((3, 4), bool)}),
        ValueError,
        ["mask", "(3, 4)"],
    ),
    ("causal", lambda x_q, x_kv, p: ((x_q, x_kv, p), {"causal": "yes"}), ValueError, ["causal"]),
]


@pytest.mark.parametrize(("label", "make", "exc", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(label, make, exc, words, rng):
    args, kwargs = make(*_bad(rng))
    kwargs.setdefault("num_heads", 3)
    with pytest.raises(exc) as info:
        MHA(*args, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_mixed_namespaces(rng):
    torch = pytest.importorskip("torch")
    x_q, x_kv, p = _bad(rng)
    with pytest.raises(TypeError, match=r"params\['w_o'\] is a torch array"):
        MHA(x_q, x_kv, {**p, "w_o": torch.asarray(p["w_o"])}, num_heads=3)
