"""Clustering, learned patterns, low rank, kernels, Synthesizer, inducing points:
exact limits against dense, approximation trends, gradients/buffers, centroid updates, the
O(n) causal scan's memory, and hyperparameter validation. Registry-wide properties (padding
invariance, causality, NaN, dtypes, jit/vmap, compiled cost) live in test_registry.py and
test_cost.py and run on these variants through cases.LEARNED_CASES.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from tests.attention.cases import LEARNED_CASES

B, T, H, D = 2, 24, 2, 8
LENGTHS = np.array([24, 15])
MASK = jnp.asarray(np.arange(T)[None] < LENGTHS[:, None])       # [B, T]


def dense(q, k, v, mask=None, causal=False):
    return attention.get("dense")(q, k, v, kv_mask=mask, causal=causal)


def real(x):
    """Outputs at real (unpadded) positions only."""
    return np.asarray(x) * np.asarray(MASK)[:, :, None, None]


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(real(a), real(b), atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(kk, (B, T, H, D)) for kk in ks]


def state(name, key=0, length=T, head_dim=D, **hp):
    return attention.get(name).init_state(jax.random.key(key), q_len=length, kv_len=length,
                                          num_heads=H, head_dim=head_dim, **hp)


pytestmark = pytest.mark.usefixtures("fast_compile")


@functools.lru_cache(maxsize=None)
def _jitted(name, causal, hp_items):
    def fn(q, k, v, mask, arrays):
        return attention.get(name)(q, k, v, kv_mask=mask, causal=causal, **dict(hp_items),
                                   **arrays)
    return jax.jit(fn)


def call(name, q, k, v, st=None, mask=MASK, causal=False, **kwargs):
    """The variant under jit (one compile per variant/hyperparameters/shapes instead of many
    eager ops): state arrays and array kwargs are traced, hyperparameters static."""
    arrays = {} if st is None else {**st["params"], **st["buffers"]}
    arrays.update({n: a for n, a in kwargs.items() if isinstance(a, jax.Array)})
    hp = tuple(sorted((n, a) for n, a in kwargs.items() if n not in arrays))
    return _jitted(name, causal, hp)(q, k, v, mask, arrays)


# ------------------------------------------------------------------------- exact limits


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_one_bucket_one_chunk_is_dense(qkv, causal):
    q, k, v = qkv
    hp = dict(num_hashes=2, num_buckets=1, chunk_size=2 * T, shared_qk=False)
    close(call("lsh", q, k, v, state("lsh", **hp), causal=causal, **hp),
          dense(q, k, v, MASK, causal))


def test_lsh_shared_qk_one_bucket_is_dense_on_unit_keys_without_self(qkv):
    """Shared QK: keys are unit queries; self only when nothing else is visible (causal i=0)."""
    q, _, v = qkv
    hp = dict(num_hashes=1, num_buckets=1, chunk_size=T, shared_qk=True)
    out = call("lsh", q, q, v, state("lsh", **hp), causal=True, **hp)
    unit = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, unit) / np.sqrt(D)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (j < i) | (i == 0) & (j == 0)
    mask = jnp.asarray(visible)[None, None] & MASK[:, None, None, :]
    w = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    close(out, jnp.einsum("bhqk,bkhd->bqhd", w, v))


def test_lsh_buckets_restrict_attention(qkv):
    """Many buckets and small chunks: a real approximation, not dense in disguise."""
    q, k, v = qkv
    hp = dict(num_hashes=1, num_buckets=8, chunk_size=4, shared_qk=False)
    out = call("lsh", q, k, v, state("lsh", **hp), **hp)
    assert np.abs(real(out) - real(dense(q, k, v, MASK))).max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_routing_one_cluster_is_dense(qkv, causal):
    """One cluster (routing head) and a window covering the sequence (local head): dense."""
    q, k, v = qkv
    hp = dict(num_clusters=1, ema_decay=0.9, local_head_fraction=0.5, local_window=T)
    close(call("routing", q, k, v, state("routing", **hp), causal=causal, **hp),
          dense(q, k, v, MASK, causal))


@pytest.mark.parametrize("causal", [False, True])
def test_routing_local_heads_are_local_attention(qkv, causal):
    """The first ceil(fraction * H) heads are local attention, the others routing heads that
    compute what the all-routing variant computes on them."""
    q, k, v = qkv
    hp = dict(num_clusters=4, ema_decay=0.9, local_window=2)
    st = state("routing", **hp)
    out = call("routing", q, k, v, st, causal=causal, local_head_fraction=0.5, **hp)
    local = call("local", q, k, v, causal=causal, window=2)
    routed = call("routing", q, k, v, st, causal=causal, local_head_fraction=0.0, **hp)
    close(out[:, :, :1], local[:, :, :1])
    close(out[:, :, 1:], routed[:, :, 1:])
    assert np.abs(real(routed[:, :, :1]) - real(local[:, :, :1])).max() > 1e-2


def test_routing_defaults_leave_no_real_query_without_attention():
    """Non-causal balanced clusters leave ~1/3 of (token, head) outputs exactly zero (queries
    no cluster picks, as in the reference code). With the default share of local heads under
    1% of real queries (tokens) get zeros in every head; all-routing heads leave many more."""
    b, t, h, d = 2, 128, 2, 8
    ks = jax.random.split(jax.random.key(8), 3)
    q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in ks)
    mask = jnp.arange(t)[None] < jnp.array([[t], [100]])
    real_q = np.asarray(mask)
    fractions = {}
    for share in (None, 0.0):
        hp = {} if share is None else dict(local_head_fraction=share)
        st = state("routing", length=t, **hp)
        out = np.asarray(call("routing", q, k, v, st, mask=mask, **hp))
        dead = np.all(out == 0, axis=-1)                       # [B, T, H]
        fractions[share] = (np.all(dead, -1)[real_q].mean(), dead[real_q].mean())
    assert fractions[None][0] < 0.01, fractions
    assert fractions[0.0][0] > 0.05 and fractions[0.0][1] > 0.2, fractions


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_one_block_is_dense(qkv, causal):
    q, k, v = qkv
    hp = dict(block_size=T, sinkhorn_iters=3, temperature=0.75)
    close(call("sinkhorn", q, k, v, state("sinkhorn", **hp), causal=causal, **hp),
          dense(q, k, v, MASK, causal))


def test_sinkhorn_permutation_is_doubly_stochastic():
    from attention.sinkhorn import sinkhorn

    logits = jax.random.normal(jax.random.key(3), (5, 5))
    p = jax.jit(lambda x: sinkhorn(x, jnp.ones((5, 5), bool), iters=30))(logits)
    np.testing.assert_allclose(p.sum(0), 1, atol=1e-4)   # the last step normalises columns
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-3)


def test_linformer_identity_projections_are_dense(qkv):
    q, k, v = qkv
    eye = jnp.broadcast_to(jnp.eye(T), (H, T, T))
    out = call("linformer", q, k, v, mask=None, proj_dim=T, E=eye, F=eye)
    np.testing.assert_allclose(out, dense(q, k, v), atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_compressed_identity_convolution_is_dense(qkv, causal):
    q, k, v = qkv
    eye = jnp.broadcast_to(jnp.eye(D), (H, 1, D, D))
    out = call("compressed", q, k, v, causal=causal, compression=1,
                                      conv_k=eye, conv_v=eye)
    close(out, dense(q, k, v, MASK, causal))


def _quadratic_kernel(qf, kf, v, mask):
    """sum_{j<=i, real} phi(q_i).phi(k_j) v_j / sum_{j<=i, real} phi(q_i).phi(k_j), float64."""
    qf, kf, v = (np.asarray(x, np.float64) for x in (qf, kf, v))
    s = np.einsum("bqhm,bkhm->bhqk", qf, kf) * np.tril(np.ones((T, T)))
    s = s * np.asarray(mask)[:, None, None, :]
    return np.einsum("bhqk,bkhd->bqhd", s, v) / s.sum(-1).transpose(0, 2, 1)[..., None]


@pytest.mark.parametrize("chunk_size", [5, 8, 64])
def test_causal_linear_is_quadratic_masked_form(qkv, chunk_size):
    from attention.linear import elu_feature

    q, k, v = qkv
    out = call("linear", q, k, v, causal=True, chunk_size=chunk_size)
    close(out, _quadratic_kernel(elu_feature(q), elu_feature(k), v, MASK), atol=1e-5)


def _favor_reference(q, k, v, w, mask, causal):
    """FAVOR+ with the reference's stabiliser, numpy float64: phi(q_i) = exp(l_q - max_m l_q) +
    eps; key j enters query i as exp(l_k,j - ref_i) + eps, ref_i the max of the key logs over the
    real keys query i sees (causal: positions <= i). l_x = w . x' - |x'|^2 / 2."""
    from attention.performer import NUMERICAL_STABILIZER as eps

    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    mask = np.asarray(mask)
    t = q.shape[1]

    def logs(x):
        x = x * x.shape[-1] ** -0.25
        return np.einsum("bthd,md->bthm", x, w) - 0.5 * np.sum(x * x, -1, keepdims=True)

    lq, lk = logs(q), logs(k)
    qf = np.exp(lq - lq.max(-1, keepdims=True)) + eps                    # [B, T, H, M]
    visible = mask[:, None, :] & (np.tril(np.ones((t, t), bool)) if causal else True)
    lkm = np.where(mask[:, :, None, None], lk, -np.inf).max(-1)          # [B, Tk, H]
    ref = np.max(np.where(visible[:, :, :, None], lkm[:, None], -np.inf), axis=2)  # [B, Tq, H]
    with np.errstate(over="ignore"):   # invisible keys may overflow; they are masked
        kf = np.exp(lk[:, None] - ref[:, :, None, :, None]) + eps        # [B, Tq, Tk, H, M]
    kf = np.where(visible[..., None, None], kf, 0.0)
    s = np.einsum("bqhm,bqkhm->bhqk", qf, kf)
    den = s.sum(-1)
    out = np.einsum("bhqk,bkhd->bqhd", s, v) / np.where(den == 0, 1, den).transpose(0, 2, 1)[
        ..., None]
    return out


@pytest.mark.parametrize("feature_map", ["favor+", "exp", "relu"])
def test_causal_performer_is_quadratic_masked_form(qkv, feature_map):
    q, k, v = qkv
    hp = dict(num_features=32, feature_map=feature_map, chunk_size=5)
    st = state("performer", **hp)
    w = {**st["params"], **st["buffers"]}["projection"]
    out = call("performer", q, k, v, st, causal=True, **hp)
    if feature_map == "relu":
        x = lambda y: y * D ** -0.25  # noqa: E731
        phi = lambda y: jax.nn.relu(jnp.einsum("bthd,md->bthm", x(y), w)) + 1e-3  # noqa: E731
        close(out, _quadratic_kernel(phi(q), phi(k), v, MASK), atol=1e-4)
    else:
        close(out, _favor_reference(q, k, v, w, MASK, causal=True), atol=1e-5)


@functools.lru_cache(maxsize=None)
def _performer_value_and_grad(causal):
    def f(q, k, v, projection):
        return attention.get("performer")(q, k, v, causal=causal, projection=projection)
    loss = lambda *a: jnp.sum(f(*a) ** 2)  # noqa: E731
    return jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("causal", [False, True])
def test_performer_large_inputs_finite_no_zero_rows(causal):
    """q, k ~ N(0, 1) * 10 and * 30 (T 64, H 2, D 16, 256 features): without the reference's
    numerical stabiliser the denominators underflow (thousands of non-finite gradient entries
    at * 10, all-zero output rows at * 30). Outputs match the float64 stabilised form."""
    t, h, d = 64, 2, 16
    ks = jax.random.split(jax.random.key(3), 3)
    w = attention.get("performer").init_state(jax.random.key(4), q_len=t, kv_len=t,
                                              num_heads=h, head_dim=d)["buffers"]["projection"]
    fwd, grad = _performer_value_and_grad(causal)
    v = jax.random.normal(ks[2], (1, t, h, d))
    for scale in (10.0, 30.0):
        q, k = (jax.random.normal(kk, (1, t, h, d)) * scale for kk in ks[:2])
        out = np.asarray(fwd(q, k, v, w))
        assert np.isfinite(out).all(), scale
        assert not np.any(np.all(out == 0, axis=-1)), scale
        ref = _favor_reference(q, k, v, w, np.ones((1, t), bool), causal)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-3)
        for g in grad(q, k, v, w):
            assert np.isfinite(np.asarray(g)).all(), scale


def test_causal_performer_ignores_later_keys_at_every_scale():
    """Changing keys and values after position 9 leaves outputs 0..8 unchanged at scales 1, 10
    and 30 (a chunk-wide key maximum let key 9 move them by ~2 in the underflow regime), and
    the causal output at i is the non-causal one on the prefix <= i."""
    t, h, d = 32, 2, 16
    ks = jax.random.split(jax.random.key(5), 5)
    w = attention.get("performer").init_state(jax.random.key(6), q_len=t, kv_len=t,
                                              num_heads=h, head_dim=d)["buffers"]["projection"]
    causal, _ = _performer_value_and_grad(True)
    plain, _ = _performer_value_and_grad(False)
    v = jax.random.normal(ks[2], (1, t, h, d))
    later = jnp.arange(t)[None, :, None, None] >= 9
    for scale in (1.0, 10.0, 30.0):
        q, k = (jax.random.normal(kk, (1, t, h, d)) * scale for kk in ks[:2])
        k2 = jnp.where(later, jax.random.normal(ks[3], k.shape) * 3 * scale, k)
        v2 = jnp.where(later, jax.random.normal(ks[4], v.shape) * 10, v)
        a, b = np.asarray(causal(q, k, v, w)), np.asarray(causal(q, k2, v2, w))
        np.testing.assert_allclose(b[:, :9], a[:, :9], atol=1e-6, rtol=1e-6)
        assert np.abs(b[:, 9:] - a[:, 9:]).max() > 1e-2   # later outputs do see the change
        i = 20
        prefix = jax.jit(lambda q, k, v, w, m: attention.get("performer")(
            q, k, v, kv_mask=m, projection=w))(q, k, v, w, jnp.arange(t)[None] <= i)
        np.testing.assert_allclose(a[:, i], np.asarray(prefix)[:, i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_synthesizer_random_with_dense_logits_is_dense(qkv, causal):
    """Logits R = q k^T / sqrt(d) of one example (full, or as factors R1 R2^T)."""
    q, k, v = qkv
    q1, k1, v1, m1 = q[:1], k[:1], v[:1], MASK[1:]
    logits = jnp.einsum("qhd,khd->hqk", q1[0], k1[0]) / np.sqrt(D)
    ref = dense(q1, k1, v1, m1, causal)
    full = call("synthesizer_random", q1, k1, v1, mask=m1, causal=causal, logits=logits)
    fact = call(
        "synthesizer_random", q1, k1, v1, mask=m1, causal=causal, factorized_rank=D,
        factor_q=jnp.swapaxes(q1[0], 0, 1) / np.sqrt(D), factor_k=jnp.swapaxes(k1[0], 0, 1))
    real1 = np.asarray(m1)[:, :, None, None]
    np.testing.assert_allclose(full * real1, ref * real1, atol=2e-5)
    np.testing.assert_allclose(fact * real1, ref * real1, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_synthesizer_dense_mlp_of_keys_is_dense(qkv, causal):
    """relu(q [I, -I]) [K; -K]^T = q K^T: the MLP reproduces dense logits of one example,
    from params built for a longer max length (sliced to T)."""
    q, k, v = qkv
    q1, k1, v1, m1 = q[:1], k[:1], v[:1], MASK[1:]
    eye = jnp.eye(D)
    w1 = jnp.broadcast_to(jnp.concatenate([eye, -eye], 1), (H, D, 2 * D))
    kt = jnp.swapaxes(k1[0], 0, 1).transpose(0, 2, 1) / np.sqrt(D)        # [H, D, T]
    w2 = jnp.pad(jnp.concatenate([kt, -kt], 1), ((0, 0), (0, 0), (0, 7)))   # max length T + 7
    out = call(
        "synthesizer_dense", q1, k1, v1, mask=m1, causal=causal, hidden_dim=2 * D, w1=w1,
        b1=jnp.zeros((H, 2 * D)), w2=w2, b2=jnp.zeros((H, T + 7)))
    real1 = np.asarray(m1)[:, :, None, None]
    np.testing.assert_allclose(out * real1, dense(q1, k1, v1, m1, causal) * real1, atol=2e-5)


# ------------------------------------------------------------------ approximation trends


def _relative_error(out, ref):
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def test_performer_error_falls_with_num_features():
    """FAVOR+ on moderate-norm inputs (|q|, |k| ~ 1.4): mean relative error over 3 draws of the
    random features falls 16 -> 256 -> 1024 (figures in the report of issue 4)."""
    ks = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(kk, (1, 64, 2, 16)) * s for kk, s in zip(ks, (0.35, 0.35, 1)))
    ref = dense(q, k, v)
    errors = []
    for m in (16, 256, 1024):
        errs = [_relative_error(call("performer", q, k, v, state("performer", seed, 64, 16,
                                     num_features=m), mask=None, num_features=m), ref)
                for seed in range(3)]
        errors.append(np.mean(errs))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 5 * errors[2] and errors[2] < 0.04, errors


def test_performer_features_are_orthogonal_blocks_of_isotropic_directions():
    """Rows within a block of d are orthogonal; directions are uniform. Without the sign fix of
    the QR factor, row i of every block leans to -e_i (mean of u_ii ~ -0.17 here)."""
    from attention.performer import orthogonal_features

    w = orthogonal_features(jax.random.key(0), 1024, 16)
    u = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    gram = jnp.einsum("nid,njd->nij", u.reshape(64, 16, 16), u.reshape(64, 16, 16))
    np.testing.assert_allclose(gram, jnp.broadcast_to(jnp.eye(16), gram.shape), atol=1e-5)
    diag = jnp.diagonal(u.reshape(64, 16, 16), axis1=1, axis2=2)   # u_ii, std 1/4 each
    assert abs(float(diag.mean())) < 0.05, float(diag.mean())
    norms = jnp.linalg.norm(w, axis=-1)       # chi(16): mean ~ 3.94
    assert 3.7 < float(norms.mean()) < 4.2 and float(norms.std()) > 0.3


def test_nystrom_error_falls_with_landmarks():
    """Moderate-norm inputs, the paper's 6 pinv iterations: error falls as landmarks grow; with
    one token per landmark (m = n) only the truncated pinv iteration is left."""
    ks = jax.random.split(jax.random.key(8), 3)
    q, k, v = (jax.random.normal(kk, (1, 64, 2, 16)) * s for kk, s in zip(ks, (0.5, 0.5, 1)))
    ref = dense(q, k, v)
    errors = [_relative_error(call("nystrom", q, k, v, mask=None, num_landmarks=m,
                                   pinv_iters=6), ref)
              for m in (2, 8, 32, 64)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05, errors


# --------------------------------------------------------------- gradients and buffers

LEARNED = sorted(LEARNED_CASES)


@pytest.mark.parametrize("name", LEARNED)
def test_gradients_reach_every_param_and_no_buffer(qkv, name):
    q, k, v = qkv
    hp = LEARNED_CASES[name]
    st = state(name, **hp)

    def loss(params, buffers, q, k, v):
        out = attention.get(name)(q, k, v, kv_mask=MASK, **hp, **params, **buffers)
        return jnp.sum((out * MASK[:, :, None, None]) ** 2)

    floats = {n: b for n, b in st["buffers"].items() if jnp.issubdtype(b.dtype, jnp.floating)}
    ints = {n: b for n, b in st["buffers"].items() if n not in floats}   # redraw counters
    gp, gb, gv = jax.jit(jax.grad(lambda p, b, q, k, v: loss(p, {**b, **ints}, q, k, v),
                                  argnums=(0, 1, 4)))(st["params"], floats, q, k, v)
    for n, g in gp.items():
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, n
    for n, g in gb.items():
        assert np.abs(np.asarray(g)).max() == 0, n
    assert np.abs(np.asarray(gv)).max() > 0


@pytest.mark.parametrize("hp", [dict(feature_map="exp"), dict(feature_map="favor+")])
def test_performer_projection_is_param_only_when_learned(hp):
    st = state("performer", num_features=8, **hp)
    learned = hp["feature_map"] == "exp"
    assert ("projection" in st["params"]) == learned
    assert ("projection" in st["buffers"]) != learned


def test_synthesizer_random_fixed_is_buffer():
    st = state("synthesizer_random", trainable=False, factorized_rank=3)
    assert not st["params"] and set(st["buffers"]) == {"factor_q", "factor_k"}


def test_routing_centroids_move_toward_data():
    """Data in 3 tight directions: EMA k-means updates bring the centroids closer to them;
    padded tokens (huge values) do not move anything."""
    variant = attention.get("routing")
    hp = dict(num_clusters=3, ema_decay=0.5, local_head_fraction=0.0)
    st = state("routing", key=1, **hp)
    dirs = jax.random.normal(jax.random.key(4), (H, 3, D))
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
    pick = jax.random.randint(jax.random.key(5), (B, T), 0, 3)
    x = jnp.einsum("btk,hkd->bthd", jax.nn.one_hot(pick, 3), dirs)
    x = x + 0.05 * jax.random.normal(jax.random.key(6), x.shape)
    garbage = 1e3 * jax.random.normal(jax.random.key(9), x.shape)
    x_padded = jnp.where(MASK[:, :, None, None], x, garbage)

    def distance(c):  # mean over data directions of 1 - cos to the nearest centroid
        return float(jnp.mean(1 - jnp.max(jnp.einsum("hkd,hjd->hkj", dirs, c), -1)))

    update = jax.jit(lambda b, x: variant.update_buffers(b, x, x, kv_mask=MASK, **hp))
    buffers = st["buffers"]
    before = distance(buffers["centroids"])
    for _ in range(10):
        new = update(buffers, x_padded)
        ref = update(buffers, x)
        np.testing.assert_allclose(new["centroids"], ref["centroids"], atol=1e-6)
        buffers = new
    after = distance(buffers["centroids"])
    assert after < before / 2, (before, after)
    np.testing.assert_allclose(jnp.linalg.norm(buffers["centroids"], axis=-1), 1, atol=1e-5)


def test_routing_local_heads_keep_their_centroids():
    hp = dict(num_clusters=3, ema_decay=0.5, local_head_fraction=0.5)
    st = state("routing", key=1, **hp)
    x = jax.random.normal(jax.random.key(4), (B, T, H, D))
    new = attention.get("routing").update_buffers(st["buffers"], x, x, kv_mask=MASK, **hp)
    np.testing.assert_array_equal(new["centroids"][0], st["buffers"]["centroids"][0])
    assert np.abs(new["centroids"][1] - st["buffers"]["centroids"][1]).max() > 1e-3


@pytest.mark.parametrize("name,buffer,interval", [("performer", "projection", 3),
                                                  ("lsh", "rotations", 1)])
def test_redraw_step_is_deterministic_in_seed_and_step(name, buffer, interval):
    """redraw="step": after c training passes the random state is draw number c // interval,
    a function of (seed, c) only: the same for the same seed (so a resumed run continues
    exactly), different for another seed, fresh at each multiple of the interval and unchanged
    in between; redraw="fixed" never changes it."""
    variant = attention.get(name)
    hp = {**LEARNED_CASES[name], "redraw": "step", "redraw_interval": interval}
    x = jax.random.normal(jax.random.key(2), (B, T, H, D))
    update = jax.jit(lambda b: variant.update_buffers(b, x, x, kv_mask=MASK, **hp))

    def run(seed, passes):
        bufs = state(name, key=seed, **hp)["buffers"]
        seen = [np.asarray(bufs[buffer])]
        for _ in range(passes):
            bufs = update(bufs)
            seen.append(np.asarray(bufs[buffer]))
        assert int(bufs["redraw_count"]) == passes
        return seen

    a, again, other = run(0, 2 * interval), run(0, 2 * interval), run(1, 2 * interval)
    for c in range(2 * interval + 1):
        np.testing.assert_array_equal(a[c], again[c])
        assert np.abs(a[c] - other[c]).max() > 1e-3
        if c:   # a new draw exactly at multiples of the interval
            assert np.array_equal(a[c], a[c - 1]) == (c % interval != 0), c
    assert len({arr.tobytes() for arr in a}) == 3            # draws 0, 1, 2
    # Draw i is fold_in(init key, i): a resumed run (restored counter and key) gets it too.
    direct = state(name, key=0, **hp)["buffers"]
    direct = {**direct, "redraw_count": jnp.asarray(2 * interval - 1, jnp.int32)}
    np.testing.assert_array_equal(update(direct)[buffer], a[-1])
    fixed = {**hp, "redraw": "fixed"}
    bufs = state(name, **fixed)["buffers"]
    assert set(bufs) == {buffer}
    np.testing.assert_array_equal(
        variant.update_buffers(bufs, x, x, kv_mask=MASK, **fixed)[buffer], bufs[buffer])


@pytest.mark.parametrize("name,sqrt_hp,int_hp", [
    ("sparse", dict(window="sqrt", stride="sqrt"), dict(window=5, stride=5)),
    ("strided", dict(stride="sqrt"), dict(stride=5)),
    ("routing", dict(num_clusters="sqrt"), dict(num_clusters=5)),
    ("sinkhorn", dict(block_size="sqrt"), dict(block_size=5)),
    ("compressed", dict(compression="sqrt"), dict(compression=5)),
])
def test_sqrt_size_is_ceil_sqrt_of_the_length(qkv, name, sqrt_hp, int_hp):
    """"sqrt" = ceil(sqrt(24)) = 5 here (state built for the max length T): same state shapes
    and the same outputs as the explicit 5."""
    q, k, v = qkv
    st_sqrt, st_int = state(name, **sqrt_hp), state(name, **int_hp)
    shapes = lambda st: {n: a.shape for n, a in {**st["params"], **st["buffers"]}.items()}  # noqa
    assert shapes(st_sqrt) == shapes(st_int)
    close(call(name, q, k, v, st_int, **sqrt_hp), call(name, q, k, v, st_int, **int_hp))


# ----------------------------------------------------------------- cost and validation


@pytest.mark.parametrize("name,hp", [("linear", {}),
                                     ("performer", dict(num_features=32, feature_map="favor+"))])
def test_causal_scan_keeps_no_per_position_state(name, hp):
    """Compiled temp memory of causal linear/performer at n=1024 (chunk 64, d=m=32) stays
    well below one n x d x d float32 tensor (what a per-position cumsum of k v^T needs)."""
    n, d = 1024, 32
    st = attention.get(name).init_state(jax.random.key(0), q_len=n, kv_len=n, num_heads=1,
                                        head_dim=d, **hp)
    x = jax.ShapeDtypeStruct((1, n, 1, d), jnp.float32)
    fn = lambda q, k, v: attention.get(name)(q, k, v, causal=True, chunk_size=64,  # noqa
                                             **hp, **st["params"], **st["buffers"])
    jax.config.update("jax_disable_most_optimizations", False)   # the memory XLA really plans
    try:
        temp = jax.jit(fn).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
    assert temp < n * d * d * 4 / 4, temp


@pytest.mark.parametrize("name", ["linformer", "nystrom", "inducing"])
def test_non_causal_variants_refuse_causal(qkv, name):
    q, k, v = qkv
    hp = LEARNED_CASES[name]
    with pytest.raises(ValueError, match=name):
        call(name, q, k, v, state(name, **hp), causal=True, **hp)


@pytest.mark.parametrize("name,bad,field", [
    ("lsh", dict(num_buckets=3), "num_buckets"),
    ("lsh", dict(chunk_size=0), "chunk_size"),
    ("lsh", dict(shared_qk=1), "shared_qk"),
    ("routing", dict(num_clusters=0), "num_clusters"),
    ("routing", dict(ema_decay=1.5), "ema_decay"),
    ("sinkhorn", dict(temperature=0.0), "temperature"),
    ("sinkhorn", dict(sinkhorn_iters=0), "sinkhorn_iters"),
    ("linformer", dict(proj_dim=0), "proj_dim"),
    ("nystrom", dict(num_landmarks=2.5), "num_landmarks"),
    ("compressed", dict(compression=0), "compression"),
    ("linear", dict(chunk_size=-1), "chunk_size"),
    ("performer", dict(feature_map="softmax"), "feature_map"),
    ("performer", dict(redraw="epoch"), "redraw"),
    ("performer", dict(feature_map="exp", redraw="step"), "redraw"),
    ("lsh", dict(redraw_interval=0), "redraw_interval"),
    ("routing", dict(local_head_fraction=1.5), "local_head_fraction"),
    ("routing", dict(local_window=-1), "local_window"),
    ("routing", dict(num_clusters="cbrt"), "num_clusters"),
    ("sinkhorn", dict(block_size="log"), "block_size"),
    ("compressed", dict(compression="sqrt2"), "compression"),
    ("performer", dict(num_features=0), "num_features"),
    ("synthesizer_dense", dict(hidden_dim=0), "hidden_dim"),
    ("synthesizer_random", dict(factorized_rank=-1), "factorized_rank"),
    ("synthesizer_random", dict(trainable="yes"), "trainable"),
    ("inducing", dict(num_inducing=0), "num_inducing"),
])
def test_invalid_hyperparameters_name_variant_and_field(qkv, name, bad, field):
    q, k, v = qkv
    hp = {**attention.hparams_for(name, LEARNED_CASES[name]), **bad}
    good = state(name, **LEARNED_CASES[name])
    with pytest.raises(ValueError, match=f"{name}.*{field}"):
        state(name, **hp)
    with pytest.raises(ValueError, match=f"{name}.*{field}"):
        call(name, q, k, v, good, **hp)


@pytest.mark.parametrize("name", ["linformer", "sinkhorn", "synthesizer_dense",
                                  "synthesizer_random"])
def test_length_sized_params_slice_and_refuse_longer(qkv, name):
    """Params built for max length 40 serve length 24 (padding to 40 changes nothing at real
    positions) and refuse length 48."""
    q, k, v = qkv
    hp = LEARNED_CASES[name]
    st = state(name, length=40, **hp)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 16), (0, 0), (0, 0)), constant_values=5.0)  # noqa
    mask40 = jnp.pad(MASK, ((0, 0), (0, 16)))
    short = call(name, q, k, v, st, **hp)
    long = call(name, pad(q), pad(k), pad(v), st, mask=mask40, **hp)[:, :T]
    close(short, long, atol=1e-5)
    pad24 = lambda x: jnp.concatenate([x, x], 1)  # noqa: E731
    with pytest.raises(ValueError, match=name):
        call(name, pad24(q), pad24(k), pad24(v), st, mask=None, **hp)
