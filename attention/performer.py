"""Performer attention, FAVOR+ (Choromanski et al., 2021, sec. 2.3-2.4, Lemma 1): the softmax
kernel exp(q.k / sqrt(d)) estimated by positive random features
phi(x) = exp(w_i . x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4), with orthogonal w_i (blocks of
a QR-orthogonalised Gaussian, rows rescaled to chi-distributed norms); linear attention on top
(attention/_linearized.py). Stabilised after the reference implementation (fast_attention.py): a
query's features are divided by their max over features, keys' by the max over the real keys
the query sees (causal: the running max up to its position, so no later key can move an
earlier output at any scale), and both get a small additive constant NUMERICAL_STABILIZER
(1e-6, the reference's `numerical_stabilizer`), so that at large |q|, |k| the denominator
cannot underflow to zero (no zero rows, finite gradients). phi(k_j) for query i is thus
exp(w . k_j' - |k_j'|^2 / 2 - ref_i) + 1e-6: the causal output at i equals the non-causal
output on the prefix <= i.

redraw: "fixed" (drawn once) or "step" (redrawn every redraw_interval training passes from
fold_in(key, draw number): the reference code's feature redraw; attention/_redraw.py); only for
the random maps (favor+, relu).

feature_map: "favor+" (default; the random projection is a buffer), "relu"
(relu(w . x') + 1e-3, the original LRA code's default, which is not a softmax estimator), "exp"
(the FAVOR+ form with the m x d projection learned: a param).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Choice, Int, _redraw, register
from attention._linearized import kernel_attention
from attention._util import check_causal, check_qkv

NAME = "performer"
FEATURE_MAPS = ("favor+", "relu", "exp")
HPARAMS = {"num_features": Int(256, min=1), "feature_map": Choice("favor+", options=FEATURE_MAPS),
           "chunk_size": Int(64, min=1), "redraw": Choice("fixed", options=_redraw.POLICIES),
           "redraw_interval": Int(1000, min=1)}
# Added to the stabilised exponential features (queries and keys), as the reference's
# numerical_stabilizer: keeps every real query's denominator >= 1e-6 * (its max feature = 1).
NUMERICAL_STABILIZER = 1e-6


def _redraw_needs_random_features(hp):
    if hp["redraw"] != "fixed" and hp["feature_map"] == "exp":
        return (f"redraw={hp['redraw']!r} needs random features (feature_map 'favor+' or "
                f"'relu'); feature_map='exp' learns its projection, use redraw='fixed'")
    return None


def orthogonal_features(key, num_features: int, dim: int):
    """[num_features, dim]: stacked blocks of orthonormal rows, each row rescaled to the norm
    of an independent standard Gaussian vector (the marginals of w ~ N(0, I))."""
    n_blocks = -(-num_features // dim)
    kg, kn = jax.random.split(key)
    q, r = jnp.linalg.qr(jax.random.normal(kg, (n_blocks, dim, dim)))   # batched QR
    # Sign-fix so that each Q is Haar-distributed: LAPACK's Householder QR leaves column i of
    # every block leaning to -e_i, which biases the estimator.
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    w = jnp.swapaxes(q, -1, -2).reshape(n_blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(kn, (num_features, dim)), axis=-1)
    return w * norms[:, None]


def init_state(key, *, q_len, kv_len, num_heads, head_dim, num_features, feature_map, redraw,
               **unused):
    """projection [num_features, D]: a buffer, or a param with feature_map="exp"; with
    redraw="step" also the redraw buffers (attention/_redraw.py)."""
    del q_len, kv_len, num_heads, unused
    w = orthogonal_features(key, num_features, head_dim)
    if feature_map == "exp":
        return {"params": {"projection": w}, "buffers": {}}
    return {"params": {}, "buffers": {"projection": w, **_redraw.buffers(key, redraw)}}


def update_buffers(buffers, q, k, *, kv_mask=None, num_features, redraw, redraw_interval,
                   **unused):
    """Training pass: with redraw="step", a fresh orthogonal projection every redraw_interval
    passes; "fixed" (or the learned "exp" map) changes nothing."""
    del q, kv_mask, unused
    if redraw == "fixed":
        return buffers
    return _redraw.step(buffers, "projection", redraw_interval,
                        lambda key: orthogonal_features(key, num_features, k.shape[-1]))


def _log_features(x, w):
    """log phi(x) up to the constant -log(sqrt(m)) (it cancels): w . x' - |x'|^2 / 2.
    x [..., D] (any layout, e.g. [B, T, H, D]) -> [..., M]."""
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    return jnp.einsum("...d,md->...m", x, w) - 0.5 * jnp.sum(x * x, -1, keepdims=True)


def query_features(x, w):
    """phi(q) up to a per-query factor (it cancels): exp(log phi - max over features) + 1e-6.
    x [..., D] -> [..., M], every real query's largest feature exactly 1 + 1e-6."""
    lq = _log_features(x, w)
    return jnp.exp(lq - jax.lax.stop_gradient(jnp.max(lq, axis=-1, keepdims=True))) \
        + NUMERICAL_STABILIZER


def feature_weights(projection, num_features: int, feature_map: str, head_dim: int):
    """The projection [M, D] as float32, checked against (num_features, head_dim); random
    features (every map but "exp") are a buffer: no gradient flows into them."""
    if projection is None or tuple(projection.shape) != (num_features, head_dim):
        raise ValueError(f"{NAME}: projection [num_features, head_dim] = "
                         f"{(num_features, head_dim)} required (from init_state); got "
                         f"{None if projection is None else tuple(projection.shape)}")
    w = projection.astype(jnp.float32)
    return w if feature_map == "exp" else jax.lax.stop_gradient(w)


@register(NAME, supports_causal=True, complexity="O(n)", init_state=init_state,
          update_buffers=update_buffers, constraint=_redraw_needs_random_features,
          hparams=HPARAMS,
          doc="Choromanski et al. 2021 (Performer): FAVOR+ positive orthogonal random features")
def performer_attention(q, k, v, *, kv_mask=None, causal=False, num_features, feature_map,
                        chunk_size, redraw, redraw_interval, projection=None, redraw_key=None,
                        redraw_count=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; projection [M, D] -> [B, Tq, H, Dv].
    redraw, redraw_interval, redraw_key, redraw_count: the redraw policy (update_buffers's)."""
    del redraw, redraw_interval, redraw_key, redraw_count
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    d = q.shape[-1]
    w = feature_weights(projection, num_features, feature_map, d)
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))      # [B, H, T, D]
    if feature_map == "relu":
        qf = jax.nn.relu(jnp.einsum("bhtd,md->bhtm", qt.astype(jnp.float32) * d ** -0.25, w))
        kf = jax.nn.relu(jnp.einsum("bhtd,md->bhtm", kt.astype(jnp.float32) * d ** -0.25, w))
        out = kernel_attention(qf + 1e-3, kf + 1e-3, vt, kv_mask, causal=causal,
                               chunk_size=chunk_size)
    else:
        out = kernel_attention(query_features(qt, w), _log_features(kt, w), vt, kv_mask,
                               causal=causal, chunk_size=chunk_size, k_log=True,
                               k_eps=NUMERICAL_STABILIZER)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)
