"""
A JAX transformer layer on ``arrayattn.jax``, gradients checked against JAX's attention
=======================================================================================

:mod:`arrayattn.jax` makes every arrayattn op a ``jax.custom_vjp`` function: the forward is the
op's array-API reference traced on JAX arrays (so ``jax.jit`` compiles it with XLA), and the
gradient is the op's hand-derived backward (FlashAttention-2 style: it keeps the output and the
row logsumexp and recomputes the probabilities), not JAX's autodiff of the forward.

Here a pre-norm transformer layer (causal multi-head self-attention + MLP) uses
:func:`arrayattn.jax.scaled_dot_product_attention` under ``jit``; the same layer with
:func:`jax.nn.dot_product_attention`, and with a plain dense attention differentiated by JAX, are
the comparisons. We check the gradients of every weight, then plot how far apart they are.
"""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import arrayattn.jax as aaj

jax.config.update("jax_enable_x64", True)  # float64, so the comparison is at rounding level

B, L, E, H = 4, 32, 64, 4  # batch, sequence length, width, heads
key = jax.random.PRNGKey(0)
keys = jax.random.split(key, 8)
params = {
    "w_qkv": jax.random.normal(keys[0], (E, 3 * E)) / E**0.5,
    "w_o": jax.random.normal(keys[1], (E, E)) / E**0.5,
    "w_1": jax.random.normal(keys[2], (E, 4 * E)) / E**0.5,
    "w_2": jax.random.normal(keys[3], (4 * E, E)) / (4 * E) ** 0.5,
    "g_1": jnp.ones(E),
    "g_2": jnp.ones(E),
}
x = jax.random.normal(keys[4], (B, L, E))
target = jax.random.normal(keys[5], (B, L, E))


def norm(x, g):
    return g * (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)


def arrayattn_attention(q, k, v):  # (B, H, L, dh), arrayattn's layout
    return aaj.scaled_dot_product_attention(q, k, v, causal=True)


def jax_attention(q, k, v):  # jax.nn wants (B, L, H, dh)
    t = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True))


def plain_attention(q, k, v):  # dense softmax attention in jnp, differentiated by JAX itself
    s = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1) @ v


def layer(params, x, attention):
    h = norm(x, params["g_1"]) @ params["w_qkv"]
    q, k, v = (a.reshape(B, L, H, E // H).transpose(0, 2, 1, 3) for a in jnp.split(h, 3, -1))
    a = attention(q, k, v).transpose(0, 2, 1, 3).reshape(B, L, E)
    x = x + a @ params["w_o"]
    return x + jax.nn.gelu(norm(x, params["g_2"]) @ params["w_1"]) @ params["w_2"]


def loss(params, x, attention):
    return jnp.mean((layer(params, x, attention) - target) ** 2)


# %%
# Forward and gradients under ``jit``
# -----------------------------------


def gradients(attention):
    return jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, attention), (0, 1)))(params, x)


def relative_errors(a, b):
    (_, (gpa, gxa)), (_, (gpb, gxb)) = a, b
    out = {"x": float(jnp.max(jnp.abs(gxa - gxb)) / jnp.max(jnp.abs(gxb)))}
    for name in params:
        out[name] = float(jnp.max(jnp.abs(gpa[name] - gpb[name])) / jnp.max(jnp.abs(gpb[name])))
    return out


ours, theirs, plain = (gradients(f) for f in (arrayattn_attention, jax_attention, plain_attention))
print(
    f"loss: arrayattn {float(ours[0]):.15f}\n      jax.nn    {float(theirs[0]):.15f}"
    f"\n      plain jnp {float(plain[0]):.15f}"
)
errors_jax = relative_errors(ours, theirs)
errors_plain = relative_errors(ours, plain)
for name in errors_jax:
    print(
        f"d loss / d {name:6s} vs jax.nn {errors_jax[name]:.1e}   vs plain jnp "
        f"{errors_plain[name]:.1e}"
    )

# %%
# The gradients agree with JAX's autodiff of a plain float64 attention to rounding level. They
# agree with :func:`jax.nn.dot_product_attention` to about 1e-7: JAX's implementation forms the
# attention logits in float32 (``preferred_element_type=float32``) even for float64 inputs, so
# that is the accuracy of the comparison, not of arrayattn.

assert max(errors_plain.values()) < 1e-10
assert max(errors_jax.values()) < 1e-5

# %%
# The same layer trains: a few steps of gradient descent on the regression target, with the
# hand-derived attention backward inside ``jit``.

step = jax.jit(
    lambda p, x: jax.tree_util.tree_map(
        lambda w, g: w - 0.5 * g, p, jax.grad(loss)(p, x, arrayattn_attention)
    )
)
history = []
p = params
for _ in range(60):
    history.append(float(loss(p, x, arrayattn_attention)))
    p = step(p, x)

# %%
# Plot: gradient agreement (left) and the training loss (right).

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
names = list(errors_jax)
pos = np.arange(len(names))
ax1.bar(
    pos - 0.2, [max(errors_jax[n], 1e-18) for n in names], 0.4, label="vs jax.nn (float32 logits)"
)
ax1.bar(pos + 0.2, [max(errors_plain[n], 1e-18) for n in names], 0.4, label="vs plain float64 jnp")
ax1.set_xticks(pos, names)
ax1.set_yscale("log")
ax1.axhline(np.finfo(np.float64).eps, color="gray", ls=":", label="float64 eps")
ax1.set_ylabel("relative max difference")
ax1.set_title("gradients of the layer")
ax1.legend(fontsize=7)
ax2.plot(history)
ax2.set_xlabel("step")
ax2.set_ylabel("MSE")
ax2.set_title("training the layer under jit")
fig.tight_layout()
plt.show()
