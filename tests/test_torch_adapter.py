"""arrayattn.torch: every registered op as a differentiable PyTorch op (generated from the
registry).

Every op is exercised through its own ``examples(rng)`` calls (small float64 inputs): forward and
gradients equal the NumPy op's, ``torch.autograd.gradcheck`` passes, ``torch.library.opcheck``
passes, and ``torch.compile(fullgraph=True)`` equals eager. Ops registered later are covered
automatically.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import arrayattn as aa  # noqa: E402
import arrayattn.torch as aat  # noqa: E402
from arrayattn._adapt import array_leaves  # noqa: E402

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
# opcheck and compile are slower (tracing); they run on each op's first example.
FIRST = [c for c in CASES if c.values[1] == 0]


def _example(name, i):
    op = OPS[name]
    args, kwargs = op.examples(np.random.default_rng(1234))[i]
    bound = inspect.signature(op).bind(*args, **kwargs)
    return op, bound


def _contiguous(value):
    if isinstance(value, np.ndarray):
        return np.array(value, order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
    if isinstance(value, dict):
        return {k: _contiguous(v) for k, v in value.items()}
    if isinstance(value, tuple):  # a sequence of arrays (merge_attention's parts)
        return tuple(_contiguous(v) for v in value)
    return value


def _to_torch(op, name, value):
    """Example value -> tensors (differentiable float arguments require grad)."""
    if isinstance(value, np.ndarray):
        t = torch.from_numpy(value.copy())
        if name in op.differentiable and t.is_floating_point():
            t.requires_grad_(True)
        return t
    if isinstance(value, dict):
        return {k: _to_torch(op, name, v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_torch(op, name, v) for v in value)
    return value


def _values(value):
    """The entries of a params dict or a sequence of arrays; the value itself otherwise."""
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, tuple) else [value]


def _leaves(arguments):
    """The tensors that require grad, in argument order (dict entries in key order)."""
    found = []
    for value in arguments.values():
        found += [v for v in _values(value) if isinstance(v, torch.Tensor) and v.requires_grad]
    return found


def _replace_leaves(arguments, new):
    it = iter(new)

    def rep(v):
        if isinstance(v, dict):
            return {k: rep(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return tuple(rep(x) for x in v)
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return next(it)
        return v

    return {k: rep(v) for k, v in arguments.items()}


def _setup(name, i):
    op, bound = _example(name, i)
    np_args = {k: _contiguous(v) for k, v in bound.arguments.items()}
    t_args = {k: _to_torch(op, k, v) for k, v in np_args.items()}
    return op, np_args, t_args


def _call(name, arguments):
    return getattr(aat, name)(**arguments)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _float_outputs(outs):
    return [o for o in _as_tuple(outs) if o.is_floating_point()]


def _loss(outs, weights):
    """A scalar mixing every float output with fixed random weights (inf entries, e.g. the
    logsumexp of a fully masked row, are left out)."""
    total = 0
    for o, w in zip(_float_outputs(outs), weights, strict=True):
        total = total + torch.where(torch.isfinite(o), o * w, torch.zeros_like(o)).sum()
    return total


def _weights(outs, seed=7):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.standard_normal(tuple(o.shape))) for o in _float_outputs(outs)]


# -- forward and backward equal the NumPy op ------------------------------------------------------


@pytest.mark.parametrize(("name", "i"), CASES)
def test_forward_and_gradients_equal_numpy(name, i):
    op, np_args, t_args = _setup(name, i)
    out_t = _call(name, t_args)
    out_np, res = op.fwd(**np_args)
    for a, b in zip(_as_tuple(out_t), _as_tuple(out_np), strict=True):
        assert tuple(a.shape) == tuple(np.shape(b))
        # Same backend, same values, same layout: bitwise the same.
        np.testing.assert_array_equal(a.detach().numpy(), np.asarray(b))
    leaves = _leaves(t_args)
    if not leaves:
        return
    weights = _weights(out_t)
    grads_t = torch.autograd.grad(_loss(out_t, weights), leaves, allow_unused=True)
    # The same cotangents through the NumPy op's .bwd.
    cts = []
    it = iter(weights)
    for o in _as_tuple(out_np):
        if np.issubdtype(np.asarray(o).dtype, np.floating):
            w = next(it).numpy()
            cts.append(np.where(np.isfinite(o), w, 0.0).astype(np.asarray(o).dtype))
        else:
            cts.append(None)
    g = op.bwd(res, tuple(cts) if len(cts) > 1 else cts[0])
    expected = []
    for arg, value in t_args.items():
        if isinstance(value, (dict, tuple)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            expected += [
                getattr(g, arg)[k]
                for k, v in items
                if isinstance(v, torch.Tensor) and v.requires_grad
            ]
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            expected.append(getattr(g, arg))
    assert len(expected) == len(grads_t)
    for got, want in zip(grads_t, expected, strict=True):
        got = np.zeros(np.shape(want)) if got is None else got.numpy()
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-12, atol=1e-13)


# -- torch's own checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "i"), CASES)
def test_gradcheck(name, i):
    op, _, t_args = _setup(name, i)
    leaves = _leaves(t_args)
    if not leaves:
        pytest.skip(f"{name}: no differentiable inputs in this example")
    out = _call(name, t_args)
    weights = _weights(out)

    def f(*xs):
        outs = _call(name, _replace_leaves(t_args, xs))
        # Zero the weights where an output is not finite (an empty row's +inf logsumexp).
        return tuple(
            torch.where(torch.isfinite(o), o, torch.zeros_like(o)) * w
            for o, w in zip(_float_outputs(outs), weights, strict=True)
        )

    assert torch.autograd.gradcheck(
        f, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize(("name", "i"), FIRST)
def test_opcheck(name, i):
    op, _, t_args = _setup(name, i)
    leaves, tensors, options = [], [], []
    for arg, value in t_args.items():
        found = array_leaves(arg, value, lambda x: isinstance(x, torch.Tensor))
        if found is None:
            options.append((arg, value))
        for key, v in found or []:
            leaves.append((arg, key))
            tensors.append(v)
    spec = aat._make_spec(tuple(leaves), tuple(options))
    forward, _ = aat._custom_ops(name)
    result = torch.library.opcheck(forward, (tensors, spec))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize(("name", "i"), FIRST)
def test_compile_fullgraph_equals_eager(name, i):
    torch._dynamo.reset()
    op, _, t_args = _setup(name, i)
    leaves = _leaves(t_args)
    weights = _weights(_call(name, t_args))

    def run(*xs):
        outs = _call(name, _replace_leaves(t_args, xs))
        return outs, _loss(outs, weights)

    # aot_eager traces the forward and the backward graphs through the fake implementations
    # (what the adapter provides) without inductor's C++ compile time.
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (run, compiled):
        out, loss = fn(*leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else ()
        results.append((out, grads))
    (out, grads), (eager_out, eager_grads) = results[1], results[0]
    for a, b in zip(_as_tuple(out), _as_tuple(eager_out), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_compile_inductor_sdpa():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )

    def f(q, k, v):
        out, lse = aat.scaled_dot_product_attention(q, k, v, causal=True, return_lse=True)
        return out.square().sum() + lse.sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# -- behaviour ------------------------------------------------------------------------------------


def test_sdpa_matches_torch_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    mask = torch.rand(7, 7, generator=g) > 0.3
    mask[:, 0] = True
    out = aat.scaled_dot_product_attention(q, k, v, mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(out, (q, k, v), go)
    theirs = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    q = base.transpose(1, 2).requires_grad_(True)  # (2, 3, 5, 4), not contiguous
    assert not q.is_contiguous()
    out = aat.scaled_dot_product_attention(q, q, q)
    qc = q.detach().contiguous().numpy()
    np.testing.assert_allclose(
        out.detach().numpy(), aa.scaled_dot_product_attention(qc, qc, qc), rtol=1e-12, atol=1e-14
    )
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_params_dict_gets_gradients():
    g = torch.Generator().manual_seed(3)
    e = 4
    params = {
        f"w_{n}": torch.randn(e, e, generator=g, dtype=torch.float64, requires_grad=True)
        for n in "qkvo"
    }
    x = torch.randn(2, 3, e, generator=g, dtype=torch.float64, requires_grad=True)
    y = aat.multi_head_attention(x, x, params, num_heads=2)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params.values())
    assert x.grad.shape == x.shape


def test_inputs_untouched_and_outputs_not_aliased():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    before = q.detach().clone()
    out, lse = aat.scaled_dot_product_attention(q, q, q, return_lse=True)
    (out.sum() + lse.sum()).backward()
    torch.testing.assert_close(q.detach(), before, rtol=0, atol=0)
    assert out.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()


def test_wrong_inputs():
    q = torch.randn(1, 4, 3)
    with pytest.raises(TypeError, match="v: expected a torch.Tensor"):
        aat.scaled_dot_product_attention(q, q, np.zeros((1, 4, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="bfloat16"):
        aat.scaled_dot_product_attention(*(q.bfloat16(),) * 3)
    with pytest.raises(AttributeError):
        aat.no_such_op  # noqa: B018
    with pytest.raises(TypeError, match="positional"):
        aat.scaled_dot_product_attention(q, q, q, None)


def test_every_op_is_generated():
    assert set(OPS) <= set(dir(aat))
    for name in OPS:
        wrapper = getattr(aat, name)
        assert wrapper is getattr(aat, name)  # built once
        assert (
            inspect.signature(wrapper).parameters.keys()
            == inspect.signature(OPS[name]).parameters.keys()
        )


def test_import_arrayattn_does_not_import_torch():
    code = "import sys, arrayattn; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.gpu
def test_cuda_tensors_run_on_cupy():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    qc = q.cuda().requires_grad_(True)
    out = aat.scaled_dot_product_attention(qc, qc, qc, causal=True)
    assert out.device == qc.device
    out.square().sum().backward()
    qn = q.numpy()
    ref, res = aa.scaled_dot_product_attention.fwd(qn, qn, qn, causal=True)
    np.testing.assert_allclose(out.detach().cpu().numpy(), ref, rtol=1e-10, atol=1e-12)
    gr = aa.scaled_dot_product_attention.bwd(res, 2 * ref)
    np.testing.assert_allclose(qc.grad.cpu().numpy(), gr.q + gr.k + gr.v, rtol=1e-9, atol=1e-11)
