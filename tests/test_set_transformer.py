"""Set Transformer blocks mab / sab / isab / pma (derivation: docs/derivations/set_transformer.rst).

Oracles: the paper's equations (§8.1) written in NumPy float64; the official module semantics
(``juho-lee/set_transformer modules.py``, docs/derivations/set_transformer.rst) re-implemented in
torch below with the same
weights, for the ``variant='code'`` blocks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import numerical_gradient
from support import RTOL, assert_close_rel, directional_check, to_xp

LN_KEYS = ("ln0_weight", "ln0_bias", "ln1_weight", "ln1_bias")


# -- NumPy oracle of the paper equations -----------------------------------------------------------


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ln(x, w=None, b=None, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def lin(x, p, w, b):
    return x @ p[w].T + p.get(b, 0)


def rff(h, p, pre=""):
    r = np.maximum(lin(h, p, pre + "w_ff", pre + "b_ff"), 0)
    return lin(r, p, pre + "w_ff2", pre + "b_ff2") if pre + "w_ff2" in p else r


def multihead(x, y, p, h):
    """Multihead(X, Y, Y) = concat_j Att(X W_j^Q, Y W_j^K, Y W_j^V) W^O (per-head scale)."""
    q, k, v = lin(x, p, "w_q", "b_q"), lin(y, p, "w_k", "b_k"), lin(y, p, "w_v", "b_v")
    dq, dv = q.shape[-1] // h, v.shape[-1] // h
    heads = []
    for j in range(h):
        qj, kj, vj = (
            q[..., j * dq : (j + 1) * dq],
            k[..., j * dq : (j + 1) * dq],
            v[..., j * dv : (j + 1) * dv],
        )
        heads.append(np_softmax(qj @ np.swapaxes(kj, -1, -2) / math.sqrt(dq)) @ vj)
    return lin(np.concatenate(heads, -1), p, "w_o", "b_o")


def paper_mab(x, y, p, h, ln=True):
    norm = (
        (lambda t, i: np_ln(t, p.get(f"ln{i}_weight"), p.get(f"ln{i}_bias")))
        if ln
        else (lambda t, i: t)
    )
    hh = norm(x + multihead(x, y, p, h), 0)
    return norm(hh + rff(hh, p), 1)


def sub(p, pre):
    return {k[len(pre) :]: v for k, v in p.items() if k.startswith(pre)}


def paper_params(rng, dx, dy, e, ev, f=None, ln=True, pre=""):
    shapes = {
        "w_q": (e, dx),
        "w_k": (e, dy),
        "w_v": (ev, dy),
        "w_o": (dx, ev),
        "b_q": (e,),
        "b_k": (e,),
        "b_v": (ev,),
        "b_o": (dx,),
    }
    if f is None:
        shapes.update(w_ff=(dx, dx), b_ff=(dx,))
    else:
        shapes.update(w_ff=(f, dx), b_ff=(f,), w_ff2=(dx, f), b_ff2=(dx,))
    if ln:
        shapes.update({k: (dx,) for k in LN_KEYS})
    p = {pre + k: rng.standard_normal(s) / math.sqrt(s[-1]) for k, s in shapes.items()}
    if ln:
        p[pre + "ln0_weight"] += 1
        p[pre + "ln1_weight"] += 1
    return p


def code_params(rng, dq, dk, dv, ln=False, pre=""):
    shapes = {
        "w_q": (dv, dq),
        "w_k": (dv, dk),
        "w_v": (dv, dk),
        "w_ff": (dv, dv),
        "b_q": (dv,),
        "b_k": (dv,),
        "b_v": (dv,),
        "b_ff": (dv,),
    }
    if ln:
        shapes.update({k: (dv,) for k in LN_KEYS})
    return {pre + k: rng.standard_normal(s) / math.sqrt(s[-1]) for k, s in shapes.items()}


@pytest.mark.parametrize("ln", [True, False])
@pytest.mark.parametrize("f", [None, 7])
def test_mab_paper_oracle(xp, ln, f, rng):
    x, y = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 3, 4))
    p = paper_params(rng, 6, 4, 4, 8, f=f, ln=ln)
    out = aa.mab(to_xp(xp, x), to_xp(xp, y), to_xp(xp, p), num_heads=2, ln=ln)
    assert_close_rel(out, paper_mab(x, y, p, 2, ln), RTOL[np.float64])


def test_sab_isab_pma_paper_oracle(rng):
    x = rng.standard_normal((3, 7, 5))
    p = paper_params(rng, 5, 5, 4, 6)
    assert_close_rel(aa.sab(x, p, num_heads=2), paper_mab(x, x, p, 2), 1e-12)
    # ISAB_m(X) = MAB(X, MAB(I, X)); inducing points of width 3 ≠ 5.
    pi = {
        "I": rng.standard_normal((4, 3)),
        **paper_params(rng, 3, 5, 4, 4, pre="mab0."),
        **paper_params(rng, 5, 3, 6, 2, f=9, pre="mab1."),
    }
    hh = paper_mab(np.broadcast_to(pi["I"], (3, 4, 3)), x, sub(pi, "mab0."), 2)
    assert_close_rel(aa.isab(x, pi, num_heads=2), paper_mab(x, hh, sub(pi, "mab1."), 2), 1e-12)
    # PMA_k(Z) = MAB(S, rFF(Z)), with and without the rFF on Z.
    pp = {
        "S": rng.standard_normal((2, 4)),
        **paper_params(rng, 4, 6, 4, 4, pre="mab."),
        "rff.w_ff": rng.standard_normal((8, 5)),
        "rff.b_ff": rng.standard_normal(8),
        "rff.w_ff2": rng.standard_normal((6, 8)),
        "rff.b_ff2": rng.standard_normal(6),
    }
    seeds = np.broadcast_to(pp["S"], (3, 2, 4))
    want = paper_mab(seeds, rff(x, pp, "rff."), sub(pp, "mab."), 2)
    assert_close_rel(aa.pma(x, pp, num_heads=2), want, 1e-12)
    pp2 = {"S": pp["S"], **paper_params(rng, 4, 5, 4, 4, pre="mab.")}
    assert_close_rel(aa.pma(x, pp2, num_heads=2), paper_mab(seeds, x, sub(pp2, "mab."), 2), 1e-12)


# -- torch re-implementation of juho-lee/set_transformer modules.py (derivation:
# docs/derivations/set_transformer.rst) --------------------


def torch_modules():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class MAB(nn.Module):
        def __init__(self, dim_Q, dim_K, dim_V, num_heads, ln=False):
            super().__init__()
            self.dim_V, self.num_heads = dim_V, num_heads
            self.fc_q, self.fc_k, self.fc_v = (
                nn.Linear(dim_Q, dim_V),
                nn.Linear(dim_K, dim_V),
                nn.Linear(dim_K, dim_V),
            )
            if ln:
                self.ln0, self.ln1 = nn.LayerNorm(dim_V), nn.LayerNorm(dim_V)
            self.fc_o = nn.Linear(dim_V, dim_V)

        def forward(self, Q, K):
            Q = self.fc_q(Q)
            K, V = self.fc_k(K), self.fc_v(K)
            dim_split = self.dim_V // self.num_heads
            Q_ = torch.cat(Q.split(dim_split, 2), 0)
            K_ = torch.cat(K.split(dim_split, 2), 0)
            V_ = torch.cat(V.split(dim_split, 2), 0)
            A = torch.softmax(Q_.bmm(K_.transpose(1, 2)) / math.sqrt(self.dim_V), 2)
            o_mat = torch.cat((Q_ + A.bmm(V_)).split(Q.size(0), 0), 2)
            o_mat = o_mat if getattr(self, "ln0", None) is None else self.ln0(o_mat)
            o_mat = o_mat + F.relu(self.fc_o(o_mat))
            o_mat = o_mat if getattr(self, "ln1", None) is None else self.ln1(o_mat)
            return o_mat

    class SAB(nn.Module):
        def __init__(self, dim_in, dim_out, num_heads, ln=False):
            super().__init__()
            self.mab = MAB(dim_in, dim_in, dim_out, num_heads, ln=ln)

        def forward(self, X):
            return self.mab(X, X)

    class ISAB(nn.Module):
        def __init__(self, dim_in, dim_out, num_heads, num_inds, ln=False):
            super().__init__()
            self.I = nn.Parameter(torch.Tensor(1, num_inds, dim_out))
            nn.init.xavier_uniform_(self.I)
            self.mab0 = MAB(dim_out, dim_in, dim_out, num_heads, ln=ln)
            self.mab1 = MAB(dim_in, dim_out, dim_out, num_heads, ln=ln)

        def forward(self, X):
            H = self.mab0(self.I.repeat(X.size(0), 1, 1), X)
            return self.mab1(X, H)

    class PMA(nn.Module):
        def __init__(self, dim, num_heads, num_seeds, ln=False):
            super().__init__()
            self.S = nn.Parameter(torch.Tensor(1, num_seeds, dim))
            nn.init.xavier_uniform_(self.S)
            self.mab = MAB(dim, dim, dim, num_heads, ln=ln)

        def forward(self, X):
            return self.mab(self.S.repeat(X.size(0), 1, 1), X)

    return torch, SAB, ISAB, PMA


_NAMES = {
    "fc_q.weight": "w_q",
    "fc_q.bias": "b_q",
    "fc_k.weight": "w_k",
    "fc_k.bias": "b_k",
    "fc_v.weight": "w_v",
    "fc_v.bias": "b_v",
    "fc_o.weight": "w_ff",
    "fc_o.bias": "b_ff",
    "ln0.weight": "ln0_weight",
    "ln0.bias": "ln0_bias",
    "ln1.weight": "ln1_weight",
    "ln1.bias": "ln1_bias",
}


def to_params(module, prefixed=True):
    """The module's state dict under arrayattn keys (``I``/``S`` without the leading 1); SAB's
    keys are not prefixed."""
    out = {}
    for name, t in module.state_dict().items():
        pre, _, last = name.rpartition(".")
        head, _, rest = name.partition(".")
        if name in ("I", "S"):
            out[name] = t.detach().numpy()[0]
        elif head in ("mab", "mab0", "mab1"):
            key = _NAMES[rest]
            out[f"{head}.{key}" if prefixed else key] = t.detach().numpy()
    return out


@pytest.mark.parametrize("ln", [False, True])
def test_code_variant_matches_official_modules(ln, rng):
    torch, SAB, ISAB, PMA = torch_modules()
    torch.manual_seed(0)
    blocks = [
        (SAB(5, 6, 3, ln=ln), aa.sab, (3, 7, 5)),
        (ISAB(5, 4, 2, num_inds=3, ln=ln), aa.isab, (3, 7, 5)),
        (PMA(6, 2, num_seeds=2, ln=ln), aa.pma, (3, 7, 6)),
    ]
    for module, op, shape in blocks:
        module = module.double()
        if ln:  # non-trivial affine layer norms
            with torch.no_grad():
                for name, t in module.named_parameters():
                    if "ln" in name:
                        t.add_(torch.randn_like(t) * 0.3)
        p = to_params(module, prefixed=op is not aa.sab)
        x = rng.standard_normal(shape)
        xt = torch.from_numpy(x).requires_grad_()
        yt = module(xt)
        dy = rng.standard_normal(tuple(yt.shape))
        grads = torch.autograd.grad(yt, [xt, *module.parameters()], torch.from_numpy(dy))
        names = ["x"] + [n for n, _ in module.named_parameters()]
        out, res = op.fwd(
            x,
            p,
            num_heads=module.mab.num_heads if hasattr(module, "mab") else 2,
            variant="code",
            ln=ln,
        )
        assert_close_rel(out, yt.detach().numpy(), 1e-12, op.name)
        g = op.bwd(res, dy)
        got = dict(to_params_like(module, g.params), x=g[0])
        for name, gt in zip(names, grads, strict=True):
            want = gt.numpy()[0] if name in ("I", "S") else gt.numpy()
            # fc_k.bias has gradient 0 in exact arithmetic (softmax is shift invariant): judge it
            # on the scale of the problem, not on its rounding noise.
            floor = 1.0 if name.endswith("fc_k.bias") else 0.0
            assert_close_rel(got[name], want, 1e-10, f"{op.name} {name}", floor=floor)


def to_params_like(module, grads):
    """arrayattn gradients keyed by the torch parameter names."""
    inverse = {v: k for k, v in _NAMES.items()}
    out = {}
    for key, g in grads.items():
        if key in ("I", "S"):
            out[key] = g
        elif "." in key:
            head, _, k = key.partition(".")
            out[f"{head}.{inverse[k]}"] = g
        else:
            out[f"mab.{inverse[key]}"] = g
    return out


# -- gradients, namespaces, edge cases, errors -----------------------------------------------------


def test_mab_gradients_elementwise(rng):
    x, y = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 2, 3))
    for variant, p in (
        ("paper", paper_params(rng, 4, 3, 4, 2, f=5)),
        ("code", code_params(rng, 4, 3, 4, ln=True)),
    ):
        kw = {"num_heads": 2, "variant": variant, "ln": True}
        out, res = aa.mab.fwd(x, y, p, **kw)
        do = rng.standard_normal(out.shape)
        g = aa.mab.bwd(res, do)
        for name, arr in (("x", x), ("y", y)):
            num = numerical_gradient(
                lambda a, n=name: float(
                    np.sum(aa.mab(**{"x": x, "y": y, n: a}, params=p, **kw) * do)
                ),
                arr,
            )
            np.testing.assert_allclose(getattr(g, name), num, rtol=1e-6, atol=1e-8, err_msg=name)
        for key in p:
            num = numerical_gradient(
                lambda a, key=key: float(np.sum(aa.mab(x, y, {**p, key: a}, **kw) * do)), p[key]
            )
            np.testing.assert_allclose(
                g.params[key], num, rtol=1e-6, atol=1e-8, err_msg=f"{variant} {key}"
            )


@pytest.mark.parametrize("name", ["mab", "sab", "isab", "pma"])
def test_gradients_directional(name, rng):
    op = getattr(aa, name)
    for args, kwargs in op.examples(rng):
        directional_check(op, args, kwargs, rng, directions=2)


def test_reference_namespaces_grads(xp, rng):
    x = rng.standard_normal((2, 4, 5))
    pi = {
        "I": rng.standard_normal((3, 5)),
        **paper_params(rng, 5, 5, 4, 4, pre="mab0."),
        **paper_params(rng, 5, 5, 4, 4, pre="mab1."),
    }
    pc = {
        "I": rng.standard_normal((3, 4)),
        **code_params(rng, 4, 5, 4, pre="mab0."),
        **code_params(rng, 5, 4, 4, pre="mab1."),
    }
    for p, variant in ((pi, "paper"), (pc, "code")):
        out0, res0 = aa.isab.fwd(x, p, num_heads=2, variant=variant)
        dy = rng.standard_normal(out0.shape)
        g0 = aa.isab.bwd(res0, dy)
        out, res = aa.isab.fwd(to_xp(xp, x), to_xp(xp, p), num_heads=2, variant=variant)
        g = aa.isab.bwd(res, to_xp(xp, dy))
        assert_close_rel(out, out0, 1e-12)
        assert_close_rel(g.x, g0.x, 1e-12)
        for k in p:
            # b_k's gradient is 0 in exact arithmetic (shift invariance): floor at the problem scale
            assert_close_rel(
                g.params[k], g0.params[k], 1e-11, k, floor=1.0 if k.endswith("b_k") else 0.0
            )


def test_size_one_sets_and_float32(rng):
    x, y = rng.standard_normal((1, 1, 4)), rng.standard_normal((1, 1, 4))
    p = paper_params(rng, 4, 4, 4, 4)
    assert_close_rel(aa.mab(x, y, p, num_heads=4), paper_mab(x, y, p, 4), 1e-12)
    x32 = rng.standard_normal((2, 6, 4)).astype(np.float32)
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    out, res = aa.sab.fwd(x32, p32, num_heads=2)
    g = aa.sab.bwd(res, np.ones_like(out))
    assert out.dtype == np.float32
    assert g.x.dtype == np.float32
    assert all(v.dtype == np.float32 for v in g.params.values())
    assert_close_rel(out, paper_mab(x32.astype(float), x32.astype(float), p, 2), 1e-5)


def test_read_only_inputs(rng):
    x = rng.standard_normal((2, 4, 5))
    p = {"S": rng.standard_normal((2, 5)), **paper_params(rng, 5, 5, 4, 4, pre="mab.")}
    for a in (x, *p.values()):
        a.setflags(write=False)
    copies = {k: v.copy() for k, v in p.items()}
    out, res = aa.pma.fwd(x, p, num_heads=2)
    aa.pma.bwd(res, np.ones_like(out))
    assert all(np.array_equal(p[k], copies[k]) for k in p)


def test_bad_inputs(rng):
    x, y = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 3, 4))
    p = paper_params(rng, 6, 4, 4, 8)
    with pytest.raises(ValueError, match=r"params: missing required keys \['w_o'\]"):
        aa.mab(x, y, {k: v for k, v in p.items() if k != "w_o"}, num_heads=2)
    with pytest.raises(ValueError, match=r"params\['w_k'\]: expected shape"):
        aa.mab(x, y, {**p, "w_k": np.ones((4, 5))}, num_heads=2)
    with pytest.raises(ValueError, match=r"params\['w_q'\].*num_heads"):
        aa.mab(x, y, p, num_heads=3)
    with pytest.raises(ValueError, match="unknown keys"):
        aa.mab(x, y, p, num_heads=2, variant="code")  # code has no w_o
    with pytest.raises(ValueError, match=r"params\['w_ff'\]"):
        aa.mab(x, y, {**p, "w_ff": np.ones((5, 6)), "b_ff": np.ones(5)}, num_heads=2)
    with pytest.raises(ValueError, match="variant"):
        aa.mab(x, y, p, num_heads=2, variant="official")
    with pytest.raises(ValueError, match="y: expected batch"):
        aa.mab(x, y[:1], p, num_heads=2)
    with pytest.raises(ValueError, match="x: expected shape"):
        aa.mab(x[0], y, p, num_heads=2)
    with pytest.raises(TypeError, match=r"params\['w_q'\]: expected dtype"):
        aa.mab(x, y, {**p, "w_q": p["w_q"].astype(np.float32)}, num_heads=2)
    pi = {
        "I": np.ones((3, 6)),
        **paper_params(rng, 6, 6, 4, 4, pre="mab0."),
        **paper_params(rng, 6, 5, 4, 4, pre="mab1."),
    }
    with pytest.raises(ValueError, match=r"params\['mab1.w_k'\]"):
        aa.isab(x, pi, num_heads=2)
    with pytest.raises(ValueError, match=r"params\['I'\]"):
        aa.isab(x, {}, num_heads=2)
    with pytest.raises(ValueError, match="unknown keys"):
        aa.pma(
            x,
            {
                "S": np.ones((1, 6)),
                "rff.w_ff": np.ones((6, 6)),
                **paper_params(rng, 6, 6, 4, 4, pre="mab."),
            },
            num_heads=2,
            variant="code",
        )
