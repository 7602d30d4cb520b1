"""arrayattn.jax: every registered op as a jax.custom_vjp function (generated from the registry).

Every op is exercised through its own ``examples(rng)`` calls (small float64 inputs): results and
gradients equal the NumPy op's, ``jax.test_util.check_grads`` passes in reverse mode, ``jit``
equals eager and ``vmap`` over a batch axis equals a loop, for the reference path and the
``pure_callback`` path. Ops registered later are covered automatically.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import arrayattn as aa  # noqa: E402
import arrayattn.jax as aaj  # noqa: E402
from arrayattn._adapt import with_leaf  # noqa: E402

jax.config.update("jax_enable_x64", True)

OPS = aa.registered_ops()


def _cases():
    cases = []
    for name, op in OPS.items():
        if op.examples is None:
            continue
        for i in range(len(op.examples(np.random.default_rng(0)))):
            cases.append(pytest.param(name, i, id=f"{name}-{i}"))
    return cases


CASES = _cases()
# Every op is checked on its first example (XLA compiles each traced function, so running every
# example of every op takes a quarter of an hour on two cores); jit == eager and vmap, which also
# run the slow op-by-op eager mode, on one op of each kind of computation.
FIRST = [c for c in CASES if c.values[1] == 0]
REPRESENTATIVE = {
    "scaled_dot_product_attention",  # tiled online softmax, Python loops over tiles
    "multi_head_attention",  # composite with nested residuals
    "neighborhood_attention_2d",  # gathers through window tables
    "criss_cross_attention",
    "linear_attention",
    "conv2d",
    "cbam",
    "gumbel_softmax",
    "luong_attention",  # several outputs
}
SUBSET = [c for c in FIRST if c.values[0] in REPRESENTATIVE]


class Example:
    """One example call split into the array leaves (a flat tuple) and the static rest."""

    def __init__(self, name, i):
        self.name = name
        self.op = op = OPS[name]
        args, kwargs = op.examples(np.random.default_rng(1234))[i]
        self.arguments = dict(inspect.signature(op).bind(*args, **kwargs).arguments)
        self.slots, self.leaves = [], []
        for arg, value in self.arguments.items():
            if isinstance(value, np.ndarray):
                self.slots.append((arg, None))
                self.leaves.append(np.array(value))
            elif isinstance(value, dict) or (  # params, or a sequence of arrays
                isinstance(value, tuple) and any(isinstance(v, np.ndarray) for v in value)
            ):
                for key, v in value.items() if isinstance(value, dict) else enumerate(value):
                    self.slots.append((arg, key))
                    self.leaves.append(np.array(v))
        self.leaves = tuple(self.leaves)
        # Which leaves check_grads may perturb: differentiable float arguments.
        self.diff = tuple(
            i
            for i, (arg, _) in enumerate(self.slots)
            if arg in op.differentiable and np.issubdtype(self.leaves[i].dtype, np.floating)
        )

    def rebuild(self, leaves):
        arguments = {k: v for k, v in self.arguments.items()}
        for (arg, key), leaf in zip(self.slots, leaves, strict=True):
            arguments[arg] = with_leaf(arguments[arg], key, leaf)
        return arguments

    def numpy(self, leaves=None):
        return self.op.fwd(**self.rebuild(self.leaves if leaves is None else leaves))

    def jax(self, *leaves, use_callback=False):
        return getattr(aaj, self.name)(**self.rebuild(leaves), use_callback=use_callback)

    def diff_fn(self, use_callback=False):
        """A function of the differentiable leaves only (the others are held fixed)."""

        def f(*xs):
            leaves = list(self.leaves)
            for i, x in zip(self.diff, xs, strict=True):
                leaves[i] = x
            return self.jax(*leaves, use_callback=use_callback)

        return f

    def weights(self, seed=7):
        rng = np.random.default_rng(seed)
        out, _ = self.numpy()
        return [rng.standard_normal(np.shape(o)) for o in _floats(out)]


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _floats(out):
    return [o for o in _tuple(out) if jnp.issubdtype(jnp.asarray(o).dtype, jnp.floating)]


def _masked_sum(out, weights):
    """Σ w · o over the finite entries of every float output (an empty row's +inf lse drops out)."""
    total = 0.0
    for o, w in zip(_floats(out), weights, strict=True):
        total = total + jnp.sum(jnp.where(jnp.isfinite(o), o * w, 0.0))
    return total


def _assert_outputs(got, expected, rtol, atol):
    for a, b in zip(_tuple(got), _tuple(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# -- results and gradients equal the NumPy op ----------------------------------------------------


@pytest.mark.parametrize(("name", "i"), FIRST)
def test_reference_path_equals_numpy(name, i):
    ex = Example(name, i)
    expected, res = ex.numpy()
    # Under jit (one XLA compile; eager JAX compiles every primitive separately, which is slow).
    got = jax.jit(ex.jax)(*ex.leaves)
    # The same reference algorithm, but XLA's own matmul/exp: agreement to float64 rounding.
    _assert_outputs(got, expected, rtol=1e-12, atol=1e-12)
    if not ex.diff:
        return
    weights = ex.weights()
    f = ex.diff_fn()
    grads = jax.jit(
        jax.grad(lambda *xs: _masked_sum(f(*xs), weights), argnums=tuple(range(len(ex.diff))))
    )(*(ex.leaves[i] for i in ex.diff))
    cts = []
    it = iter(weights)
    for o in _tuple(expected):
        o = np.asarray(o)
        cts.append(
            np.where(np.isfinite(o), next(it), 0.0).astype(o.dtype)
            if np.issubdtype(o.dtype, np.floating)
            else None
        )
    g = ex.op.bwd(res, tuple(cts) if len(cts) > 1 else cts[0])
    for j, grad in zip(ex.diff, grads, strict=True):
        arg, key = ex.slots[j]
        want = getattr(g, arg) if key is None else getattr(g, arg)[key]
        np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "i"), FIRST)
def test_check_grads_reverse(name, i):
    ex = Example(name, i)
    if not ex.diff:
        pytest.skip(f"{name}: no differentiable inputs in this example")
    weights = ex.weights()
    f = ex.diff_fn()
    check_grads(
        jax.jit(lambda *xs: _masked_sum(f(*xs), weights)),
        tuple(ex.leaves[i] for i in ex.diff),
        order=1,
        modes=("rev",),
        eps=1e-6,
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize(("name", "i"), SUBSET)
def test_jit_equals_eager(name, i):
    ex = Example(name, i)
    eager = ex.jax(*ex.leaves)
    jitted = jax.jit(ex.jax)(*ex.leaves)
    _assert_outputs(jitted, eager, rtol=1e-12, atol=1e-13)
    if ex.diff:
        weights = ex.weights()
        f = ex.diff_fn()
        loss = lambda *xs: _masked_sum(f(*xs), weights)  # noqa: E731
        argnums = tuple(range(len(ex.diff)))
        xs = tuple(ex.leaves[i] for i in ex.diff)
        _assert_outputs(
            jax.jit(jax.grad(loss, argnums))(*xs),
            jax.grad(loss, argnums)(*xs),
            rtol=1e-11,
            atol=1e-13,
        )


def _batched(ex, seed=11):
    """Two versions of every leaf stacked on a new axis 0 (the second perturbed for floats)."""
    rng = np.random.default_rng(seed)
    out = []
    for leaf in ex.leaves:
        other = leaf + 0.1 * rng.standard_normal(leaf.shape) if leaf.dtype.kind == "f" else leaf
        out.append(np.stack([leaf, other.astype(leaf.dtype)]))
    return tuple(out)


@pytest.mark.parametrize("use_callback", [False, True], ids=["reference", "callback"])
@pytest.mark.parametrize(("name", "i"), SUBSET)
def test_vmap_over_batch_axis(name, i, use_callback):
    ex = Example(name, i)
    batch = _batched(ex)
    run = lambda *leaves: ex.jax(*leaves, use_callback=use_callback)  # noqa: E731
    mapped = jax.jit(jax.vmap(run))(*batch)
    for b in range(2):
        expected, _ = ex.numpy(tuple(x[b] for x in batch))
        _assert_outputs(tuple(o[b] for o in _tuple(mapped)), expected, rtol=1e-12, atol=1e-12)
    if ex.diff:
        weights = ex.weights()

        def loss(*leaves):
            return _masked_sum(run(*leaves), weights)

        argnums = ex.diff
        vg = jax.jit(jax.vmap(jax.grad(loss, argnums)))(*batch)
        grad = jax.jit(jax.grad(loss, argnums))
        for b in range(2):
            gb = grad(*(x[b] for x in batch))
            _assert_outputs(tuple(g[b] for g in vg), gb, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(("name", "i"), FIRST)
def test_callback_path_equals_numpy(name, i):
    ex = Example(name, i)
    expected, res = ex.numpy()
    got = jax.jit(lambda *xs: ex.jax(*xs, use_callback=True))(*ex.leaves)
    # The NumPy backend itself runs: bitwise its results.
    for a, b in zip(_tuple(got), _tuple(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if not ex.diff:
        return
    weights = ex.weights()
    f = ex.diff_fn(use_callback=True)
    xs = tuple(ex.leaves[i] for i in ex.diff)
    argnums = tuple(range(len(xs)))
    loss = lambda *xs: _masked_sum(f(*xs), weights)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums))(*xs)
    reference = jax.jit(jax.grad(lambda *xs: _masked_sum(ex.diff_fn()(*xs), weights), argnums))(*xs)
    _assert_outputs(grads, reference, rtol=1e-10, atol=1e-12)


# -- behaviour ------------------------------------------------------------------------------------


def test_sdpa_gradient_matches_jax_attention():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 8))) for _ in range(3))  # (B, L, H, d)
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (B, H, L, d)

    def ours(q, k, v):
        return t(aaj.scaled_dot_product_attention(t(q), t(k), t(v), causal=True))

    def jax_nn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    def plain(q, k, v):  # dense float64 attention, differentiated by JAX's autodiff
        s = t(q) @ jnp.swapaxes(t(k), -1, -2) / jnp.sqrt(8.0)
        s = jnp.where(jnp.tril(jnp.ones((7, 7), bool)), s, -jnp.inf)
        return t(jax.nn.softmax(s, axis=-1) @ t(v))

    w = jnp.asarray(rng.standard_normal((2, 7, 3, 8)))
    grads = {
        f.__name__: jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), (0, 1, 2)))(q, k, v)
        for f in (ours, jax_nn, plain)
    }
    np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads["ours"], grads["plain"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # jax.nn.dot_product_attention forms the logits in float32 even for float64 inputs, so
    # agreement with it is at float32 level.
    np.testing.assert_allclose(ours(q, k, v), jax_nn(q, k, v), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["ours"], grads["jax_nn"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_static_options_are_bound_not_traced():
    q = jnp.ones((1, 4, 3))
    f = jax.jit(
        lambda q: aaj.scaled_dot_product_attention(q, q, q, causal="bottom_right", scale=0.5)
    )
    assert f(q).shape == (1, 4, 3)
    with pytest.raises(TypeError, match="hashable"):
        aaj.multi_head_attention(q, q, {"w_q": q[0]}, num_heads=[1])


def test_every_op_is_generated():
    assert set(OPS) <= set(dir(aaj))
    for name in OPS:
        assert getattr(aaj, name) is getattr(aaj, name)
        params = inspect.signature(getattr(aaj, name)).parameters
        assert "use_callback" in params
    with pytest.raises(AttributeError):
        aaj.no_such_op  # noqa: B018


def test_representative_subset_names_registered_ops():
    assert REPRESENTATIVE <= set(OPS)
