"""Any arrayattn op, blockwise over Dask arrays chunked along their batch (leading) axes.

:func:`apply` and :func:`vjp` turn one op call on Dask arrays into one task per chunk of the batch
axes: each task runs the op (or its ``fwd``/``bwd``) on NumPy or CuPy blocks, on whatever backend
the setting picks there, and the results are lazy Dask arrays. Runs on a local scheduler or on a
``dask.distributed`` cluster alike.

Which axes are batch axes comes from the op's documented shape legend (numpydoc ``shape (...)``
or ``broadcastable to (...)`` of each array parameter): the axes of ``...``, or a leading ``N``;
the named axes after them are the ones the op works across (attends over, convolves, ...), and an
array chunked along one of those raises ``ValueError`` naming it (nothing is rechunked behind the
caller's back). Arrays without batch axes (weights, parameter mappings) go whole to every task,
and their gradients are summed over the chunks. When an array argument has no documented shape,
every array must be a single chunk and the call is one task.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
import re
import uuid
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import array_api_compat
import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from ._adapt import array_leaves, call_arguments, leaf_of
from ._op import Op

__all__ = ["apply", "vjp"]


# -- the shape legend of an op's parameters --------------------------------------------------------


class _Legend(NamedTuple):
    """``core``: trailing axes the op works across; ``None`` = no batch axes (goes whole)."""

    core: int | None
    names: tuple[str, ...] = ()


_SHAPE = re.compile(r"(?:shape|broadcastable to) (\([^()]*\))", re.IGNORECASE)
_ELEMENTWISE = re.compile(r"any shape|shape of ``?\w+|same shape as", re.IGNORECASE)


@functools.cache
def _legends(op: Op) -> dict[str, _Legend | None]:
    """Parameter name -> its legend, from the numpydoc Parameters section of the op."""
    doc = inspect.getdoc(op) or ""
    if "Parameters\n----------\n" not in doc:
        return {}
    section = doc.split("Parameters\n----------\n", 1)[1]
    section = re.split(r"\n\w[\w ]*\n-{3,}\n", section)[0]  # up to the next section
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in section.splitlines():
        m = re.match(r"^([A-Za-z_][\w, ]*?) : (.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split(",")]
            for name in current:
                entries[name] = m.group(2)
        else:
            for name in current:
                entries[name] += " " + line.strip()
    legends: dict[str, _Legend | None] = {}
    for name, text in entries.items():
        shape = _SHAPE.search(text)
        if shape:
            tokens = tuple(t.strip() for t in shape.group(1)[1:-1].split(",") if t.strip())
            if tokens and tokens[0] in ("...", "N"):
                legends[name] = _Legend(len(tokens) - 1, tokens[1:])
            else:
                legends[name] = _Legend(None, tokens)
        elif _ELEMENTWISE.search(text):
            legends[name] = _Legend(0)
        else:
            legends[name] = None
    return legends


# -- one call split into leaves ------------------------------------------------------------------


def _is_array(x: Any) -> bool:
    return isinstance(x, da.Array) or array_api_compat.is_array_api_obj(x)


class _Leaf(NamedTuple):
    label: str  # for messages: q, params['w_q'], outs[1]
    array: da.Array
    loop: int  # how many leading axes are batch axes (0: it goes whole to every task)
    given: bool  # a Dask array from the caller (its chunks are the caller's)
    known: bool  # the op documents its shape (else it can only go whole to a single task)


class _Blockwise:
    """One op call over Dask arrays: the batch grid and which block of each leaf a task gets."""

    def __init__(self, op: Op, args: tuple, kwargs: dict):
        if not isinstance(op, Op):
            raise TypeError(f"op: expected an arrayattn op, got {type(op).__name__}")
        self.op = op
        bound = inspect.signature(op).bind(*args, **kwargs)
        legends = _legends(op)
        self.keys: list[tuple[str, Any]] = []
        self.leaves: list[_Leaf] = []
        self.options: list[tuple[str, Any]] = []
        for name, value in bound.arguments.items():
            found = array_leaves(name, value, _is_array)
            if found is None:
                self.options.append((name, value))
                continue
            for key, a in found:
                label = name if key is None else f"{name}[{key!r}]"
                given = isinstance(a, da.Array)
                arr = a if given else da.from_array(a, chunks=a.shape)
                legend = None if isinstance(value, dict) else legends.get(name, None)
                self.keys.append((name, key))
                known = isinstance(value, dict) or legend is not None
                loop = self._loop_axes(arr, legend)
                self.leaves.append(_Leaf(label, arr, loop, given, known))
        unknown = [leaf for leaf in self.leaves if not leaf.known]
        if unknown:  # nothing can be split consistently with it: one task gets everything
            for leaf in self.leaves:
                if any(n > 1 for n in leaf.array.numblocks):
                    raise ValueError(
                        f"{leaf.label}: {op.name} documents no shape for {unknown[0].label}, so "
                        "arrayattn.dask cannot split the call; pass every array as one chunk "
                        f"(got chunks {leaf.array.chunks})"
                    )
            self.leaves = [leaf._replace(loop=0) for leaf in self.leaves]
        self._align()

    @staticmethod
    def _loop_axes(a: da.Array, legend: _Legend | None) -> int:
        if legend is None or legend.core is None:
            return 0
        return max(a.ndim - legend.core, 0)

    def _align(self) -> None:
        """The batch shape (leaves' batch axes broadcast from the right) and its chunks.

        An axis on which two leaves disagree (neither is 1), e.g. the heads of grouped-query
        attention, is no batch axis: it and the batch axes after it go whole to every task.
        """
        nb = max((leaf.loop for leaf in self.leaves), default=0)
        shape: list[int] = []
        for axis in range(nb):
            sizes = {
                leaf.array.shape[axis - nb + leaf.loop]
                for leaf in self.leaves
                if axis - nb + leaf.loop >= 0
            } - {1}
            if len(sizes) > 1:
                break
            shape.append(sizes.pop() if sizes else 1)
        cut = len(shape)
        # Leaves align from the right; dropping the batch axes from `cut` on keeps a leaf's first
        # loop - (nb - cut) batch axes.
        self.leaves = [leaf._replace(loop=max(0, leaf.loop - (nb - cut))) for leaf in self.leaves]
        self.shape = tuple(shape)
        chunks = []
        for axis in range(cut):  # the caller's chunks of this axis, from the first Dask leaf
            chosen = None
            for leaf in self.leaves:
                local = axis - cut + leaf.loop
                if leaf.given and local >= 0 and leaf.array.shape[local] == shape[axis]:
                    chosen = leaf.array.chunks[local]
                    break
            chunks.append(chosen or (shape[axis],))
        self.chunks = tuple(chunks)
        self.leaves = [self._conform(leaf) for leaf in self.leaves]

    def _conform(self, leaf: _Leaf) -> _Leaf:
        """Check a leaf's chunks: whole along core axes, the grid's chunks along batch axes."""
        a, nb = leaf.array, len(self.shape)
        for axis in range(leaf.loop, a.ndim):
            if a.numblocks[axis] > 1:
                allowed = (
                    f"chunk only its leading batch axes (the first {leaf.loop} here)"
                    if leaf.loop
                    else "it has no batch axes here: pass it as one chunk"
                )
                raise ValueError(
                    f"{leaf.label}: chunked along axis {axis - a.ndim} (size {a.shape[axis]}), "
                    f"which {self.op.name} works across; {allowed}, e.g. with .rechunk()"
                )
        target = list(a.chunks)
        for local in range(leaf.loop):
            axis = local + nb - leaf.loop
            if a.shape[local] == self.shape[axis]:
                target[local] = self.chunks[axis]
        if tuple(target) != a.chunks:  # batch axes only: cheap and invisible in the results
            a = a.rechunk(tuple(target))
        return leaf._replace(array=a)

    # -- tasks -----------------------------------------------------------------------------------

    def blocks(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(len(c)) for c in self.chunks)))

    def leaf_index(self, leaf: _Leaf, block: tuple[int, ...]) -> tuple[int, ...]:
        nb = len(self.shape)
        idx = []
        for local in range(leaf.array.ndim):
            if local < leaf.loop and leaf.array.numblocks[local] > 1:
                idx.append(block[local + nb - leaf.loop])
            else:
                idx.append(0)
        return tuple(idx)

    @functools.cached_property
    def delayed_leaves(self) -> list[Any]:
        return [leaf.array.to_delayed() for leaf in self.leaves]

    def task_arrays(self, block: tuple[int, ...]) -> list[Any]:
        return [
            d[self.leaf_index(leaf, block)]
            for leaf, d in zip(self.leaves, self.delayed_leaves, strict=True)
        ]

    def probe(self) -> tuple[list[tuple[tuple[int, ...], Any, Any]], bool]:
        """Per output: (shape after the batch axes, dtype, meta); and whether the op returns a
        tuple. From the op on constant stand-ins with an empty batch (no work, nothing of the
        caller's computed), or, for an op that rejects an empty batch, a batch of one; each
        output must keep the batch axes in front."""
        try:
            return self._probe(0)
        except ValueError as exc:
            if "keep the batch axes" in str(exc):
                raise
            return self._probe(1)

    def _probe(self, size: int) -> tuple[list[tuple[tuple[int, ...], Any, Any]], bool]:
        nb = len(self.shape)
        arrays = []
        for leaf in self.leaves:
            a = leaf.array
            shape = list(a.shape)
            for local in range(leaf.loop):
                if shape[local] != 1:  # an axis broadcast along the batch stays 1
                    shape[local] = size
            meta = a._meta
            xp = array_api_compat.array_namespace(meta)
            fill = True if meta.dtype == bool else (0 if meta.dtype.kind in "iu" else 0.5)
            arrays.append(xp.full(tuple(shape), fill, dtype=meta.dtype))
        args, kwargs = call_arguments(self.op, self.keys, self.options, arrays)
        batch = tuple(size if n != 1 else 1 for n in self.shape)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            out = self.op(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        result = []
        for j, o in enumerate(outs):
            if tuple(o.shape[:nb]) != batch:
                raise ValueError(
                    f"{self.op.name}: output {j} has shape {tuple(o.shape)} for a batch of shape "
                    f"{batch}; it does not keep the batch axes in front, so the op cannot run "
                    "blockwise"
                )
            xp = array_api_compat.array_namespace(o)
            result.append((tuple(o.shape[nb:]), o.dtype, xp.empty((0,) * o.ndim, dtype=o.dtype)))
        return result, isinstance(out, tuple)

    def assemble(self, name: str, parts: dict, core: tuple[int, ...], meta: Any) -> da.Array:
        """A Dask array whose block ``b`` (followed by zeros for the core axes) is ``parts[b]``."""
        name = f"{name}-{uuid.uuid4().hex}"
        zeros = (0,) * len(core)
        layer: dict[Any, Any] = {(name, *b, *zeros): d.key for b, d in parts.items()}
        graph = HighLevelGraph.from_collections(name, layer, dependencies=list(parts.values()))
        chunks = self.chunks + tuple((n,) for n in core)
        return da.Array(graph, name, chunks, meta=meta)


def _run(op: Op, keys, options, save: bool, *arrays):
    args, kwargs = call_arguments(op, keys, options, arrays)
    if save:
        out, res = op.fwd(*args, **kwargs)
        return (out if isinstance(out, tuple) else (out,)), res
    out = op(*args, **kwargs)
    return (out if isinstance(out, tuple) else (out,)), None


def _forward(op: Op, args: tuple, kwargs: dict, save: bool):
    plan = _Blockwise(op, args, kwargs)
    specs, multiple = plan.probe()
    run = dask.delayed(_run, pure=True)
    tasks = {
        b: run(op, tuple(plan.keys), tuple(plan.options), save, *plan.task_arrays(b))
        for b in plan.blocks()
    }
    pick = dask.delayed(operator.getitem, pure=True)
    outs = tuple(
        plan.assemble(
            f"{op.name}-out{j}", {b: pick(pick(t, 0), j) for b, t in tasks.items()}, core, meta
        )
        for j, (core, _, meta) in enumerate(specs)
    )
    return plan, tasks, outs, multiple


def apply(op: Op, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` blockwise over Dask arrays chunked along their batch axes.

    Parameters
    ----------
    op : arrayattn op
        Any op, e.g. :func:`arrayattn.scaled_dot_product_attention`.
    *args, **kwargs
        The op's arguments. Array arguments may be Dask arrays chunked along their leading batch
        axes (``...`` or ``N`` in the op's shape legend) and nowhere else; NumPy (or CuPy) arrays
        and parameter mappings go whole to every task (arrays with batch axes are split like the
        Dask ones).

    Returns
    -------
    Dask array, or tuple of Dask arrays
        What the op returns, chunked like the batch axes of the inputs; lazy: one task per chunk.

    Raises
    ------
    ValueError
        An array is chunked along an axis the op works across (the message names it), or the op
        does not keep the batch axes in front of its outputs.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> import arrayattn as aa, arrayattn.dask as aad
    >>> rng = np.random.default_rng(0)
    >>> q = da.from_array(rng.standard_normal((8, 2, 16, 4)), chunks=(2, 2, 16, 4))
    >>> out = aad.apply(aa.scaled_dot_product_attention, q, q, q, causal=True)
    >>> out.chunks[0], out.numblocks
    ((2, 2, 2, 2), (4, 1, 1, 1))
    >>> bool(np.allclose(out.compute(),
    ...      aa.scaled_dot_product_attention(q.compute(), q.compute(), q.compute(), causal=True)))
    True
    """
    _, _, outs, multiple = _forward(op, args, kwargs, save=False)
    return outs if multiple else outs[0]


def _sum(*grads):
    total = grads[0]
    for g in grads[1:]:
        total = total + g
    return total


def _grads(op: Op, res, *cts):
    return op.bwd(res, cts if len(cts) > 1 else cts[0])


def _leaf_grad(grads, name: str, key: Any):
    return leaf_of(getattr(grads, name), key)


def vjp(op: Op, *args: Any, **kwargs: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(outputs, pullback)`` of ``op`` blockwise over Dask arrays (see :func:`apply`).

    ``pullback(cotangents)`` takes Dask (or NumPy) cotangents shaped like the outputs and returns
    the op's gradient record (``op.Grads``) of lazy Dask arrays: each array argument's gradient
    chunked like it, and for arguments every task shares (weights, parameter mappings, arrays
    broadcast along a batch axis) the sum over the chunks. Each chunk's backward reuses the
    residuals of its forward task.

    Parameters
    ----------
    op : Op
        A registered op.
    *args, **kwargs
        Its arguments, arrays as Dask arrays chunked along batch axes only.

    Returns
    -------
    outputs : dask array or tuple of dask arrays
        Lazy, one task per chunk.
    pullback : callable
        ``pullback(cotangents)`` -> the gradient record of lazy Dask arrays.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> import arrayattn as aa, arrayattn.dask as aad
    >>> rng = np.random.default_rng(0)
    >>> E, h = 8, 2
    >>> params = {f"w_{n}": rng.standard_normal((E, E)) / E for n in "qkvo"}
    >>> x = da.from_array(rng.standard_normal((6, 5, E)), chunks=(2, 5, E))
    >>> y, pullback = aad.vjp(aa.multi_head_attention, x, x, params, num_heads=h)
    >>> g = pullback(da.ones_like(y))
    >>> g.x_q.chunks[0], g.params["w_q"].shape, g.params["w_q"].numblocks
    ((2, 2, 2), (8, 8), (1, 1))
    """
    plan, tasks, outs, multiple = _forward(op, args, kwargs, save=True)

    def pullback(cotangents: Any) -> Any:  # numpydoc ignore=GL08
        cts = cotangents if multiple else (cotangents,)
        if not isinstance(cts, tuple) or len(cts) != len(outs):
            raise TypeError(
                f"cotangents: {op.name} has {len(outs)} outputs; expected "
                + ("a tuple of that many arrays or None" if multiple else "one array")
            )
        blocks: list[Any] = []
        for j, (ct, out) in enumerate(zip(cts, outs, strict=True)):
            if ct is None:
                blocks.append(None)
                continue
            if not _is_array(ct):
                raise TypeError(
                    f"cotangent of output {j}: expected an array, got {type(ct).__name__}"
                )
            if tuple(ct.shape) != tuple(out.shape):
                raise ValueError(
                    f"cotangent of output {j}: expected shape {tuple(out.shape)}, "
                    f"got {tuple(ct.shape)}"
                )
            ct = ct if isinstance(ct, da.Array) else da.from_array(ct, chunks=out.chunks)
            blocks.append(ct.rechunk(out.chunks).to_delayed())
        bwd = dask.delayed(_grads, pure=True)
        grads = {
            b: bwd(
                op,
                dask.delayed(operator.getitem, pure=True)(t, 1),
                *(None if d is None else d[b + (0,) * (d.ndim - len(b))] for d in blocks),
            )
            for b, t in tasks.items()
        }
        fields: dict[str, Any] = {name: None for name in op.differentiable}
        pieces: dict[str, dict[Any, Any]] = {}
        for (name, key), leaf in zip(plan.keys, plan.leaves, strict=True):
            if name not in op.differentiable:
                continue
            pieces.setdefault(name, {})[key] = _gather(plan, op, grads, name, key, leaf)
        for name, by_key in pieces.items():
            if None in by_key:
                fields[name] = by_key[None]
            elif all(type(k) is int for k in by_key):
                fields[name] = tuple(by_key[i] for i in range(len(by_key)))
            else:
                fields[name] = dict(by_key)
        return op.Grads(**fields)

    return (outs if multiple else outs[0]), pullback


def _gather(plan: _Blockwise, op: Op, grads: dict, name: str, key: Any, leaf: _Leaf) -> da.Array:
    """The gradient of one leaf: its blocks from the tasks that used them, summed where a block
    was shared by several tasks (a leaf without batch axes, or broadcast along one)."""
    pick = dask.delayed(_leaf_grad, pure=True)
    by_block: dict[tuple[int, ...], list[Any]] = {}
    for b, g in grads.items():
        by_block.setdefault(plan.leaf_index(leaf, b), []).append(pick(g, name, key))
    summed = {
        idx: (parts[0] if len(parts) == 1 else dask.delayed(_sum, pure=True)(*parts))
        for idx, parts in by_block.items()
    }
    a = leaf.array
    gname = f"{op.name}-d{name}-{uuid.uuid4().hex}"
    layer: dict[Any, Any] = {(gname, *idx): d.key for idx, d in summed.items()}
    graph = HighLevelGraph.from_collections(gname, layer, dependencies=list(summed.values()))
    chunks = tuple(
        a.chunks[i] if i < leaf.loop and a.numblocks[i] > 1 else (a.shape[i],)
        for i in range(a.ndim)
    )
    return da.Array(graph, gname, chunks, meta=a._meta)
