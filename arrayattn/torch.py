"""PyTorch adapter: every arrayattn op as a differentiable PyTorch op.

``arrayattn.torch.<op>`` exists for every public op (:func:`arrayattn.registered_ops`), generated on
first access, and takes the op's own arguments with :class:`torch.Tensor` arrays (a parameter
mapping such as ``params`` is a ``dict`` of tensors)::

    import torch
    import arrayattn.torch as aat

    q = torch.randn(2, 4, 128, 32, requires_grad=True)
    out = aat.scaled_dot_product_attention(q, q, q, causal=True)
    out.sum().backward()                                       # q.grad, via the op's .bwd

Notes
-----
Each op is two :func:`torch.library.custom_op` operators, ``arrayattn::<op>`` (forward: outputs,
the residual arrays backward needs, and the backends that ran) and ``arrayattn::<op>_bwd``,
joined by :func:`torch.library.register_autograd`, so the ops work under autograd,
``torch.compile(fullgraph=True)`` and :func:`torch.library.opcheck`. The array arguments travel as
one ``Tensor[]``; everything else (the static options) as a JSON string, which is a compile-time
constant.

* CPU tensors run the selected backend (``auto``: Numba where it has a kernel, else the array-API
  reference) on zero-copy NumPy views of the tensors; CUDA tensors run on zero-copy CuPy views
  (DLPack). Results come back as tensors without a copy, except where an array is not contiguous
  or shares memory with another result (PyTorch operators may not return aliases).
* The residuals are the op's :class:`arrayattn.Residuals` record: arrays that are inputs or
  outputs are not duplicated, the others are extra outputs of the forward operator (hence saved
  by autograd as tensors, visible to saved-tensor hooks), and backward rebuilds the record and
  calls the op's ``.bwd`` on the backend that ran the forward.
* Shapes for tracing (``register_fake``) come from running the op's array-API reference on
  ``meta`` tensors of the same shapes, which computes nothing (cached per shape; symbolic sizes
  are specialised). Where the backend that runs keeps another residual record
  than the reference (other keys, shapes or static options), its record cannot travel through the
  traced graph: the forward then keeps no residuals and backward runs the forward again (on the
  same backend) before calling ``.bwd`` — correct, at the cost of one more forward.

Limits: float16, float32 and float64 (NumPy and CuPy have no bfloat16); second derivatives are not
supported (backward is not itself differentiable); the backend setting in effect when the forward
runs is the one used (backward follows it).

Examples
--------
>>> import torch, arrayattn.torch as aat
>>> q = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
>>> out = aat.scaled_dot_product_attention(q, q, q, causal=True)
>>> out.shape
torch.Size([1, 2, 5, 4])
>>> out.sum().backward()
>>> q.grad.shape
torch.Size([1, 2, 5, 4])
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np
import torch

from . import _op, _registry
from ._adapt import array_leaves, call_arguments, generated_module, leaf_of
from ._config import use_backend

__all__: list[str] = []  # the ops are generated: see __dir__ / arrayattn.registered_ops()

_NAMESPACE = "arrayattn"
_BACKEND_NAMES = _registry.backend_names()


# -- the static part of a call: JSON with tuples, lists and dicts kept apart ----------------------


def _encode(arg: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return ["v", value]
    if isinstance(value, int):
        return ["v", int(value)]
    if isinstance(value, float):
        return ["v", float(value)]
    if isinstance(value, tuple):
        return ["t", [_encode(arg, v) for v in value]]
    if isinstance(value, list):
        return ["l", [_encode(arg, v) for v in value]]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ["d", {k: _encode(arg, v) for k, v in value.items()}]
    if hasattr(value, "__dlpack__") or hasattr(value, "__array_namespace__"):
        raise TypeError(
            f"{arg}: expected a torch.Tensor (arrayattn.torch takes tensors), got "
            f"{type(value).__name__}"
        )
    raise TypeError(
        f"{arg}: arrayattn.torch passes options as constants; expected None, bool, int, float, str "
        f"or a tuple/list/dict of them, got {type(value).__name__}"
    )


def _decode(value: Any) -> Any:
    tag, body = value
    if tag == "v":
        return body
    if tag == "t":
        return tuple(_decode(v) for v in body)
    if tag == "l":
        return [_decode(v) for v in body]
    return {k: _decode(v) for k, v in body.items()}


@torch.compiler.assume_constant_result
def _make_spec(leaves: tuple, options: tuple) -> str:
    """The forward operator's string argument: which argument each tensor is, and the options."""
    return json.dumps(
        {
            "leaves": [list(leaf) for leaf in leaves],
            "options": {k: _encode(k, v) for k, v in options},
        },
        sort_keys=True,
    )


@functools.lru_cache(maxsize=1024)
def _parse_spec(spec: str) -> tuple[tuple[tuple[str, str | None], ...], dict[str, Any]]:
    data = json.loads(spec)
    leaves = tuple((name, key) for name, key in data["leaves"])
    return leaves, {k: _decode(v) for k, v in data["options"].items()}


def _call_arguments(op: _op.Op, spec: str, arrays: list) -> tuple[list, dict]:
    """(args, kwargs) of ``op`` with the arrays put back where the spec says they came from."""
    leaves, options = _parse_spec(spec)
    return call_arguments(op, leaves, options, arrays)


# -- tensors <-> NumPy / CuPy arrays --------------------------------------------------------------


def _to_array(t: torch.Tensor) -> Any:
    if t.dtype == torch.bfloat16:
        raise TypeError(
            "arrayattn.torch runs the NumPy/CuPy backends, which have no bfloat16; "
            "use float16, float32 or float64 tensors"
        )
    if t.device.type == "cpu":
        return np.from_dlpack(t.detach())
    if t.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(t.detach())
    raise TypeError(f"arrayattn.torch: tensors on {t.device} are not supported (cpu or cuda only)")


def _may_share(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b)
    if type(a).__module__.startswith("cupy") and type(b).__module__.startswith("cupy"):
        import cupy

        return cupy.may_share_memory(a, b)
    return False


def _export(arrays: list, forbidden: list) -> list[torch.Tensor]:
    """Arrays as tensors without copying, except where a result would alias an input or another
    result, or is not contiguous (so it matches the strides the fake implementation promises)."""
    out: list[torch.Tensor] = []
    kept: list = []
    for a in arrays:
        if isinstance(a, np.generic):  # a NumPy scalar where a 0-d array was due
            a = np.asarray(a)
        if isinstance(a, np.ndarray):
            if (
                not a.flags.c_contiguous
                or not a.flags.writeable
                or any(_may_share(a, b) for b in forbidden + kept)
            ):
                a = np.array(a, order="C", copy=True)
            t = torch.from_numpy(a)
        else:  # CuPy
            import cupy

            if not a.flags.c_contiguous or any(_may_share(a, b) for b in forbidden + kept):
                a = cupy.array(a, order="C", copy=True)
            t = torch.from_dlpack(a)
        kept.append(a)
        out.append(t)
    return out


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# -- the residual record: layout and static part --------------------------------------------------


def _layout(
    res: _op.Residuals, leaves: list, outs: tuple
) -> tuple[tuple[tuple[str, str, int], ...], list]:
    """Where each residual array lives: ("input", i), ("output", j), ("saved", s) or ("none", -1);
    and the list of the saved (extra) arrays."""
    entries: list[tuple[str, str, int]] = []
    saved: list[Any] = []
    for key, a in sorted(res.arrays.items()):  # canonical order: backends may save in any
        if a is None:
            entries.append((key, "none", -1))
        elif any(a is x for x in leaves):
            entries.append((key, "input", next(i for i, x in enumerate(leaves) if a is x)))
        elif any(a is o for o in outs):
            entries.append((key, "output", next(j for j, o in enumerate(outs) if a is o)))
        else:
            entries.append((key, "saved", len(saved)))
            saved.append(a)
    return tuple(entries), saved


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _outputs_spec(outputs: tuple) -> tuple:
    return tuple(
        (name, tuple(int(s) for s in shape), _dtype_name(dt)) for name, shape, dt in outputs
    )


def _skeleton_spec(sk: _op.Skeleton) -> _op.Skeleton:
    """The skeleton with every backend dropped and dtypes named: comparable across namespaces."""
    return sk._replace(
        backend="",
        nested=tuple((key, _skeleton_spec(inner)) for key, inner in sk.nested),
        outputs=_outputs_spec(sk.outputs),
    )


def _restore_skeleton(spec: _op.Skeleton, backends: list[str]) -> _op.Skeleton:
    def dtypes(sk):
        return sk._replace(
            nested=tuple((key, dtypes(inner)) for key, inner in sk.nested),
            outputs=tuple((name, shape, np.dtype(dt)) for name, shape, dt in sk.outputs),
        )

    return dtypes(spec).with_backends(backends)


class _Plan:
    """The reference's residual record for one call signature, computed on meta tensors."""

    def __init__(self, layout, skeleton, saved_meta):
        self.layout, self.skeleton, self.saved_meta = layout, skeleton, saved_meta
        self.outputs = skeleton.outputs
        self.n_records = len(skeleton.backends())


def _run_reference(op: _op.Op, spec: str, tensors: list) -> tuple[tuple, _op.Residuals]:
    args, kwargs = _call_arguments(op, spec, tensors)
    with use_backend("array_api"):
        out, res = op.fwd(*args, **kwargs)
    return (out if isinstance(out, tuple) else (out,)), res


@functools.lru_cache(maxsize=512)
def _plan(name: str, spec: str, metas: tuple) -> _Plan:
    op = _op.registered_ops()[name]
    tensors = [torch.empty(shape, dtype=getattr(torch, dt), device="meta") for shape, dt in metas]
    outs, res = _run_reference(op, spec, tensors)
    layout, saved = _layout(res, tensors, outs)
    return _Plan(
        layout,
        _skeleton_spec(res.skeleton),
        tuple((tuple(a.shape), _dtype_name(a.dtype)) for a in saved),
    )


def _metas(arrays: list) -> tuple:
    return tuple((tuple(int(s) for s in a.shape), _dtype_name(a.dtype)) for a in arrays)


# -- the custom operators --------------------------------------------------------------------------


def _differentiable_leaves(op: _op.Op, spec: str) -> list[int]:
    leaves, _ = _parse_spec(spec)
    return [i for i, (name, _) in enumerate(leaves) if name in op.differentiable]


@functools.cache
def _custom_ops(name: str):
    op = _op.registered_ops()[name]

    @torch.library.custom_op(f"{_NAMESPACE}::{name}", mutates_args=())
    def forward(
        arrays: list[torch.Tensor], spec: str
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        xs = [_to_array(t) for t in arrays]
        args, kwargs = _call_arguments(op, spec, xs)
        out, res = op.fwd(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        layout, saved = _layout(res, xs, outs)
        plan = _plan(name, spec, _metas(arrays))
        device = arrays[0].device if arrays else torch.device("cpu")
        got = (layout, _skeleton_spec(res.skeleton), _metas(saved))
        if got != (plan.layout, plan.skeleton, plan.saved_meta):
            # Every backend fills in the op's residual schema with the reference's shapes and
            # dtypes (tests/test_kernels.py checks it): a difference is a kernel bug.
            raise AssertionError(
                f"{name}[{res.backend}]: the residual record differs from the reference's, "
                f"which the traced graph was built for:\n{got}\n{(plan.layout, plan.skeleton)}"
            )
        codes = torch.tensor(
            [_BACKEND_NAMES.index(b) for b in res.skeleton.backends()],
            dtype=torch.int64,
            device=device,
        )
        tensors = _export(list(outs) + saved, xs)
        return tensors[: len(outs)], tensors[len(outs) :], codes

    @forward.register_fake
    def _(arrays, spec):
        # The reference run on meta tensors of these shapes (cached): symbolic sizes are
        # specialised (``int()`` guards on them), since references compute with Python ints.
        plan = _plan(name, spec, _metas(arrays))
        device = arrays[0].device if arrays else torch.device("cpu")

        def empty(shape, dt):
            return torch.empty(shape, dtype=getattr(torch, dt), device=device)

        return (
            [empty(shape, dt) for _, shape, dt in plan.outputs],
            [empty(shape, dt) for shape, dt in plan.saved_meta],
            empty((plan.n_records,), "int64"),
        )

    @torch.library.custom_op(f"{_NAMESPACE}::{name}_bwd", mutates_args=())
    def backward(
        arrays: list[torch.Tensor],
        outputs: list[torch.Tensor],
        saved: list[torch.Tensor],
        codes: torch.Tensor,
        cotangents: list[torch.Tensor],
        spec: str,
    ) -> list[torch.Tensor]:
        xs = [_to_array(t) for t in arrays]
        outs = [_to_array(t) for t in outputs]
        kept = [_to_array(t) for t in saved]
        cts = [_to_array(t) for t in cotangents]
        plan = _plan(name, spec, _metas(arrays))
        source = {"input": xs, "output": outs, "saved": kept}
        res = _op.Residuals.from_skeleton(
            _restore_skeleton(plan.skeleton, [_BACKEND_NAMES[c] for c in codes.tolist()]),
            {key: (None if kind == "none" else source[kind][i]) for key, kind, i in plan.layout},
        )
        grads = op.bwd(res, tuple(cts) if len(cts) > 1 else cts[0])
        leaves, _ = _parse_spec(spec)
        result = []
        for i in _differentiable_leaves(op, spec):
            arg, key = leaves[i]
            g = leaf_of(getattr(grads, arg), key)
            if g is None:  # the op gives no gradient for this array: it does not depend on it
                g = array_api_compat.array_namespace(xs[i]).zeros_like(xs[i])
            result.append(g)
        return _export(result, xs + outs + kept + cts)

    @backward.register_fake
    def _(arrays, outputs, saved, codes, cotangents, spec):
        return [_empty_like(arrays[i]) for i in _differentiable_leaves(op, spec)]

    def setup_context(ctx, inputs, output):
        arrays, spec = inputs
        outs, saved, codes = output
        ctx.counts = (len(arrays), len(outs), len(saved))
        ctx.spec = spec
        ctx.save_for_backward(*arrays, *outs, *saved, codes)

    def autograd_backward(ctx, grad_outs, grad_saved, grad_codes):
        n_in, n_out, n_saved = ctx.counts
        tensors = ctx.saved_tensors
        arrays = list(tensors[:n_in])
        outs = list(tensors[n_in : n_in + n_out])
        saved = list(tensors[n_in + n_out : n_in + n_out + n_saved])
        codes = tensors[-1]
        cts = [
            torch.zeros_like(o) if g is None else g for g, o in zip(grad_outs, outs, strict=True)
        ]
        grads = backward(arrays, outs, saved, codes, cts, ctx.spec)
        result: list[torch.Tensor | None] = [None] * n_in
        for i, g in zip(_differentiable_leaves(op, ctx.spec), grads, strict=True):
            result[i] = g
        return result, None

    forward.register_autograd(autograd_backward, setup_context=setup_context)
    return forward, backward


# -- the public wrappers ---------------------------------------------------------------------------


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _make_wrapper(op: _op.Op) -> Callable[..., Any]:
    sig = inspect.signature(op)
    params = [
        (p.name, p.kind)
        for p in sig.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    positional = [
        name
        for name, kind in params
        if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    forward, _ = _custom_ops(op.name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise TypeError(
                f"{op.name}() takes {len(positional)} positional arguments but {len(args)} were "
                "given"
            )
        # args may be fewer than the positional parameters (the rest given by keyword)
        arguments = dict(zip(positional, args, strict=False))
        for key, value in kwargs.items():
            if key in arguments:
                raise TypeError(f"{op.name}() got multiple values for argument {key!r}")
            arguments[key] = value
        leaves: list[tuple[str, str | int | None]] = []
        tensors: list[Any] = []
        options: list[tuple[str, Any]] = []
        for name, value in arguments.items():
            found = array_leaves(name, value, _is_tensor)
            if found is None:
                options.append((name, value))
            for leaf_key, v in found or []:
                leaves.append((name, leaf_key))
                tensors.append(v)
        spec = _make_spec(tuple(leaves), tuple(options))
        outs, _, _ = forward(tensors, spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    wrapper.__name__ = wrapper.__qualname__ = op.name
    wrapper.__module__ = __name__
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        return_annotation=inspect.Signature.empty
    )
    wrapper.__doc__ = (
        f"PyTorch version of :func:`arrayattn.{op.name}`: the same arguments, with torch "
        "tensors.\n\n"
        "Differentiable under torch autograd with respect to "
        f"{', '.join(op.differentiable) or 'nothing'}"
        " (tensors with ``requires_grad``); works under ``torch.compile(fullgraph=True)``. "
        "See :mod:`arrayattn.torch`.\n"
    )
    return wrapper


__getattr__, __dir__ = generated_module("arrayattn.torch", globals(), _make_wrapper)
