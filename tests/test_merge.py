"""merge_attention: partial attention over disjoint key sets merged by logsumexp.

The oracle is scaled_dot_product_attention over the concatenated keys (itself tested against a
dense float64 oracle in test_sdpa.py): splitting the keys, running SDPA on each part and merging
must give the whole attention, forward and (through the parts' lse cotangents) backward.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from support import assert_close_rel, load_namespace, sdpa_oracle, to_numpy, to_xp

MERGE = aa.merge_attention
SDPA = aa.scaled_dot_product_attention


def _split_keys(k, v, sizes):
    edges = np.cumsum([0, *sizes])
    assert edges[-1] == k.shape[-2]
    return [(k[..., a:b, :], v[..., a:b, :]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _parts(q, k, v, sizes, masks=None, **options):
    """SDPA over each key part: (outs, lses, residuals)."""
    outs, lses, res = [], [], []
    for i, (kp, vp) in enumerate(_split_keys(k, v, sizes)):
        mask = None if masks is None else masks[i]
        (o, lse), r = SDPA.fwd(q, kp, vp, mask=mask, return_lse=True, **options)
        outs.append(o)
        lses.append(lse)
        res.append(r)
    return tuple(outs), tuple(lses), res


@pytest.mark.parametrize(
    "sizes",
    [(6, 5), (1, 9, 1), (11,), (4, 0, 7), (2, 3, 2, 4)],
    ids=["two", "uneven", "one", "empty_part", "four"],
)
def test_equals_sdpa_over_concatenated_keys(rng, sizes):
    q = rng.standard_normal((2, 3, 7, 5))
    k = rng.standard_normal((2, 3, 11, 5))
    v = rng.standard_normal((2, 3, 11, 4))
    outs, lses, _ = _parts(q, k, v, sizes)
    out, lse = MERGE(outs, lses)
    want, want_lse = sdpa_oracle(q, k, v)
    assert out.dtype == np.float64
    assert lse.dtype == np.float64
    assert_close_rel(out, want, 1e-13, "out")
    assert_close_rel(lse, want_lse, 1e-13, "lse")


def test_masked_parts_and_rows(rng):
    """A part masked out for some rows contributes nothing there; a row masked in every part is
    0 with lse +inf, and its gradients are zero."""
    q = rng.standard_normal((2, 6, 4))
    k = rng.standard_normal((2, 9, 4))
    v = rng.standard_normal((2, 9, 3))
    mask = rng.random((2, 6, 9)) > 0.4
    mask[:, 0, :] = False  # row 0: nothing anywhere
    mask[:, 1, :5] = False  # row 1: nothing in the first part
    mask[:, 2, 5:] = False  # row 2: nothing in the second part
    outs, lses, res = _parts(q, k, v, (5, 4), masks=(mask[..., :5], mask[..., 5:]))
    assert np.isinf(lses[0][:, 1]).all()
    assert np.isinf(lses[1][:, 2]).all()
    (out, lse), mres = MERGE.fwd(outs, lses)
    want, want_lse = sdpa_oracle(q, k, v, mask=mask)
    assert_close_rel(out, want, 1e-13, "out")
    assert_close_rel(lse, want_lse, 1e-13, "lse")
    assert (out[:, 0] == 0).all()
    assert (lse[:, 0] == np.inf).all()
    dout, dlse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    g = MERGE.bwd(mres, (dout, dlse))
    for part in range(2):
        assert np.isfinite(g.outs[part]).all()
        assert np.isfinite(g.lses[part]).all()
        assert (g.outs[part][:, 0] == 0).all()
        assert (g.lses[part][:, 0] == 0).all()
    assert (g.outs[0][:, 1] == 0).all()
    assert (g.lses[0][:, 1] == 0).all()
    assert (g.outs[1][:, 2] == 0).all()
    assert (g.lses[1][:, 2] == 0).all()


def test_an_empty_part_is_ignored_whatever_its_output_holds(rng):
    o1, l1 = rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 4))
    junk = np.full((3, 4, 2), np.nan)
    out, lse = MERGE((o1, junk), (l1, np.full((3, 4), np.inf)))
    np.testing.assert_array_equal(out, o1)
    np.testing.assert_array_equal(lse, l1)
    junk_inf = np.full((3, 4, 2), np.inf)  # 0·inf must not appear either (no warning, no NaN)
    out, res = MERGE.fwd((junk_inf, o1), (np.full((3, 4), np.inf), l1))
    g = MERGE.bwd(res, (np.ones_like(out[0]), np.ones_like(out[1])))
    np.testing.assert_array_equal(out[0], o1)
    assert (g.outs[0] == 0).all()
    assert (g.lses[0] == 0).all()


def test_backward_through_the_parts_equals_sdpa_backward(rng):
    """Chain rule across the merge: each part's SDPA.bwd, fed merge's cotangents for its output
    and its logsumexp, sums to the gradient of attention over all keys (the ring backward)."""
    q = rng.standard_normal((2, 5, 4))
    k = rng.standard_normal((2, 12, 4))
    v = rng.standard_normal((2, 12, 3))
    sizes = (3, 5, 4)
    outs, lses, res = _parts(q, k, v, sizes, causal="bottom_right")
    (out, lse), mres = MERGE.fwd(outs, lses)
    dout, dlse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    gm = MERGE.bwd(mres, (dout, dlse))
    dq = np.zeros_like(q)
    dks, dvs = [], []
    for r, do, dl in zip(res, gm.outs, gm.lses, strict=True):
        g = SDPA.bwd(r, (do, dl))
        dq += g.q
        dks.append(g.k)
        dvs.append(g.v)
    # Bottom-right causal over the parts = bottom-right over the whole only for the last part;
    # compare with the whole attention under the equivalent explicit mask instead.
    keep = np.concatenate(
        [np.arange(n)[None, :] <= np.arange(5)[:, None] + n - 5 for n in sizes], axis=-1
    )
    (wo, wl), wres = SDPA.fwd(q, k, v, mask=keep, return_lse=True)
    assert_close_rel(out, wo, 1e-13, "out")
    assert_close_rel(lse, wl, 1e-13, "lse")
    gw = SDPA.bwd(wres, (dout, dlse))
    assert_close_rel(dq, gw.q, 1e-12, "dq")
    assert_close_rel(np.concatenate(dks, axis=-2), gw.k, 1e-12, "dk")
    assert_close_rel(np.concatenate(dvs, axis=-2), gw.v, 1e-12, "dv")


@pytest.mark.parametrize("with_empty", [False, True])
def test_gradients_equal_finite_differences(rng, with_empty):
    n = 3
    outs = [rng.standard_normal((2, 4, 3)) for _ in range(n)]
    lses = [rng.standard_normal((2, 4)) for _ in range(n)]
    if with_empty:
        outs[1][:, :2] = 0.0
        lses[1][:, :2] = np.inf
        for i in range(n):
            outs[i][1, 3] = 0.0
            lses[i][1, 3] = np.inf
    dout, dlse = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4))
    (out, lse), res = MERGE.fwd(tuple(outs), tuple(lses))
    g = MERGE.bwd(res, (dout, dlse))

    def loss(os_, ls_):
        o, lse_ = MERGE(tuple(os_), tuple(ls_))
        return float(np.sum(o * dout) + np.sum(np.where(np.isfinite(lse_), lse_ * dlse, 0.0)))

    for i in range(n):

        def f_out(x):
            return loss([x if j == i else outs[j] for j in range(n)], lses)

        def f_lse(x):
            return loss(outs, [x if j == i else lses[j] for j in range(n)])

        assert_close_rel(g.outs[i], numerical_gradient(f_out, outs[i]), 1e-7, f"outs[{i}]")
        fd = numerical_gradient(f_lse, lses[i])
        fd[~np.isfinite(lses[i])] = 0.0  # inf ± eps: no difference, and no gradient
        assert_close_rel(g.lses[i], fd, 1e-7, f"lses[{i}]")
    errors = directional_errors(MERGE, (tuple(outs), tuple(lses)), {}, rng=rng)
    assert set(errors) == {f"{a}[{i}]" for a in ("outs", "lses") for i in range(n)}
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_parts(rng, dtype):
    q = rng.standard_normal((2, 6, 8))
    k = rng.standard_normal((2, 10, 8))
    v = rng.standard_normal((2, 10, 8))
    outs, lses, _ = _parts(*(a.astype(dtype) for a in (q, k, v)), (4, 6))
    out, lse = MERGE(outs, lses)
    assert out.dtype == dtype
    assert lse.dtype == np.float32
    want, want_lse = sdpa_oracle(q, k, v)
    # The merge adds at most a few roundings of the output dtype to those of the parts.
    naive = sdpa_oracle(q.astype(dtype), k.astype(dtype), v.astype(dtype), dtype=dtype)[0]
    budget = 2 * np.max(np.abs(naive - want)) + 4 * np.finfo(dtype).eps
    assert np.max(np.abs(out.astype(np.float64) - want)) <= budget
    assert_close_rel(lse, want_lse, 1e-5 if dtype == np.float32 else 2e-3, "lse")


def test_other_namespaces(rng):
    xp = load_namespace("array_api_strict")
    outs = tuple(rng.standard_normal((2, 3, 4)) for _ in range(2))
    lses = (rng.standard_normal((2, 3)), np.full((2, 3), np.inf))
    (out, lse), res = MERGE.fwd(
        tuple(to_xp(xp, o) for o in outs), tuple(to_xp(xp, x) for x in lses)
    )
    ct = (to_xp(xp, np.ones((2, 3, 4))), to_xp(xp, np.ones((2, 3))))
    g = MERGE.bwd(res, ct)
    ref_out, ref_res = MERGE.fwd(outs, lses)
    ref_g = MERGE.bwd(ref_res, (np.ones((2, 3, 4)), np.ones((2, 3))))
    np.testing.assert_allclose(to_numpy(out), ref_out[0], rtol=1e-15)
    np.testing.assert_array_equal(to_numpy(lse), ref_out[1])
    for a, b in zip(g.outs + g.lses, ref_g.outs + ref_g.lses, strict=True):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-15, atol=1e-300)


def test_inputs_untouched_and_not_returned(rng):
    outs = tuple(rng.standard_normal((3, 2)) for _ in range(2))
    lses = tuple(rng.standard_normal(3) for _ in range(2))
    for a in outs + lses:
        a.flags.writeable = False
    out, lse = MERGE(outs[:1], lses[:1])  # one part: equal values, but fresh arrays
    np.testing.assert_array_equal(out, outs[0])
    assert not np.shares_memory(out, outs[0])
    assert not np.shares_memory(lse, lses[0])
    out, res = MERGE.fwd(list(outs), list(lses))  # lists are sequences too
    g = MERGE.bwd(res, (None, np.ones(3)))
    assert isinstance(g.outs, tuple)
    assert len(g.lses) == 2


@pytest.mark.parametrize(
    ("outs", "lses", "error", "match"),
    [
        (np.zeros((2, 3, 4)), (np.zeros((2, 3)),), TypeError, "outs: expected a sequence"),
        ((), (), ValueError, "outs: expected at least one part"),
        ((np.zeros((3, 4)),), (np.zeros(3), np.zeros(3)), ValueError, "lses: expected one"),
        ((np.zeros((3, 4)), np.zeros((3, 5))), (np.zeros(3),) * 2, ValueError, r"outs\[1\]"),
        ((np.zeros((3, 4)),), (np.zeros(4),), ValueError, r"lses\[0\]: expected shape"),
        ((np.zeros(4),), (np.zeros(()),), ValueError, r"outs\[0\]: expected shape"),
        (
            (np.zeros((3, 4)), np.zeros((3, 4), np.float32)),
            (np.zeros(3),) * 2,
            TypeError,
            r"outs\[1\]: expected dtype float64",
        ),
        ((np.zeros((3, 4), int),), (np.zeros(3),), TypeError, r"outs\[0\]: expected a real"),
        ((np.zeros((3, 4)),), ([0.0, 0.0, 0.0],), TypeError, r"lses\[0\]: expected an array"),
    ],
    ids=["array", "empty", "count", "shape", "lse_shape", "ndim", "dtype", "int", "list"],
)
def test_bad_inputs(outs, lses, error, match):
    with pytest.raises(error, match=match):
        MERGE(outs, lses)


def test_mixed_namespaces_raise(rng):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different namespaces"):
        MERGE((np.zeros((3, 4)), torch.zeros(3, 4, dtype=torch.float64)), (np.zeros(3),) * 2)


def test_docstring_examples_run():
    import doctest

    import arrayattn.merge

    result = doctest.testmod(arrayattn.merge, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
