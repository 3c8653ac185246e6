"""Gated linear recurrences (gla, deltanet, gated_deltanet) and differential attention (diff):
each chunkwise form equals its step-by-step recurrence in float64 (outputs and gradients, at
several chunk sizes, with padding, causal and the bidirectional causal=False form), and the
limits: gla with every gate 1 is plain causal linear attention (identity features, no
denominator); gated_deltanet with every decay 1 is deltanet; diff with lambda 0 is dense
softmax attention on the first half of q and k. bf16 at a long length stays finite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import delta as delta_mod
from attention import gla as gla_mod
from tests.attention.compile_options import FAST_COMPILE

pytestmark = pytest.mark.usefixtures("fast_compile")  # small shapes: compile time dominates

B, T, H, D = 2, 19, 2, 4      # T = 19: every chunk size below (4, 8, 16) leaves a partial chunk
PADS = 3


def inputs(seed, t=T, d=D, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q, k, v, ct = (rng.standard_normal((B, t, H, d)).astype(dtype) for _ in range(4))
    mask = np.ones((B, t), bool)
    mask[1, -PADS:] = False
    return q, k, v, ct, mask


def scan_time(step, s0, *xs):
    """Step-by-step recurrence: xs [B, H, T, ...] -> stacked outputs [B, H, T, ...]."""
    _, out = jax.lax.scan(step, s0, tuple(jnp.moveaxis(x, 2, 0) for x in xs))
    return jnp.moveaxis(out, 0, 2)


def both_ways(fn, causal, *xs):
    out = fn(*xs)
    if causal:
        return out
    return out + jnp.flip(fn(*(jnp.flip(x, 2) for x in xs)), 2)


def gla_recurrence(q, k, v, g):
    """S_t = diag(exp g_t) S_{t-1} + k_t v_t^T; o_t = q_t^T S_t. [B, H, T, .] each."""
    def step(s, x):
        qt, kt, vt, gt = x
        s = jnp.exp(gt)[..., None] * s + kt[..., :, None] * vt[..., None, :]
        return s, jnp.einsum("bhd,bhde->bhe", qt, s)
    return scan_time(step, jnp.zeros(k.shape[:2] + (k.shape[-1], v.shape[-1]), q.dtype),
                     q, k, v, g)


def gla_reference(q, k, v, mask, *, causal, output_norm, gate_temperature, gate_down, gate_up,
                  gate_bias, **unused):
    m4 = mask[:, None, :, None]
    g = jnp.where(m4, gla_mod.log_gates(k, gate_down, gate_up, gate_bias, gate_temperature), 0)
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    kt, vt = jnp.where(m4, kt, 0.0), jnp.where(m4, vt, 0.0)
    out = both_ways(gla_recurrence, causal, qt / np.sqrt(q.shape[-1]), kt, vt, g)
    if output_norm:
        out = out / jnp.sqrt(jnp.mean(out * out, -1, keepdims=True) + gla_mod.RMS_EPS)
    return jnp.swapaxes(out, 1, 2)


def grads_of(fn, q, k, v, ct, params):
    """(out, d/d(q, k, v, params) of sum(out * ct)), jitted."""
    def loss(q, k, v, params):
        out = fn(q, k, v, params)
        return jnp.sum(out * ct), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True),
                          compiler_options=FAST_COMPILE)(q, k, v, params)
    return out, g


def assert_same(a, b, tol=1e-9):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def state(name, d=D, dtype=jnp.float64, **hp):
    st = attention.get(name).init_state(jax.random.key(3), q_len=T, kv_len=T, num_heads=H,
                                        head_dim=d, **hp)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), st["params"])


@pytest.mark.parametrize("causal", [True, False])
def test_gla_chunkwise_equals_recurrence(causal):
    with jax.enable_x64(True):
        q, k, v, ct, mask = inputs(0)
        params = state("gla")
        params["gate_bias"] = params["gate_bias"] - 2.0   # decays ~0.9 per step
        hp = attention.hparams_for("gla", {"output_norm": not causal})
        ref = grads_of(lambda q, k, v, p: gla_reference(q, k, v, mask, causal=causal, **hp,
                                                        **p), q, k, v, ct, params)
        for chunk in (4, 16) if causal else (8,):
            hp["chunk_size"] = chunk
            got = grads_of(lambda q, k, v, p: attention.get("gla").fn(
                q, k, v, kv_mask=mask, causal=causal, **hp, **p), q, k, v, ct, params)
            assert_same(got, ref)
        # padded keys and values get no gradient
        np.testing.assert_array_equal(np.asarray(got[1][1])[1, -PADS:], 0.0)
        np.testing.assert_array_equal(np.asarray(got[1][2])[1, -PADS:], 0.0)


def test_gla_with_every_gate_one_is_linear_attention_without_denominator():
    with jax.enable_x64(True):
        q, k, v, _, mask = inputs(1)
        params = state("gla")
        params["gate_bias"] = params["gate_bias"] + 1e4    # log_sigmoid = 0: alpha = 1
        hp = attention.hparams_for("gla", {"chunk_size": 8, "output_norm": False})
        out = jax.jit(lambda q, k, v: attention.get("gla").fn(
            q, k, v, kv_mask=mask, causal=True, **hp, **params),
            compiler_options=FAST_COMPILE)(q, k, v)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
        keep = np.tril(np.ones((T, T), bool))[None, None] & mask[:, None, None, :]
        ref = np.einsum("bhqk,bkhd->bqhd", np.where(keep, scores, 0.0), v)
        np.testing.assert_allclose(out, ref, atol=1e-10, rtol=1e-10)


def test_gla_bf16_long_sequence_with_strong_decay():
    """2048 positions, decays down to exp(-60 / 16) per step: cumulative log-decays reach
    thousands, which a factorisation q e^G . k e^-G would overflow; the output stays finite and
    close to the float32 recurrence."""
    t, d = 2048, 4
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, t, 1, d)).astype(np.float32) for _ in range(3))
    params = attention.get("gla").init_state(jax.random.key(0), q_len=t, kv_len=t,
                                              num_heads=1, head_dim=d)["params"]
    params["gate_bias"] = jnp.full((1, d), -60.0).at[0, 0].set(2.0)   # one slow channel
    hp = attention.hparams_for("gla", {"output_norm": False})
    out = jax.jit(lambda q, k, v: attention.get("gla").fn(q, k, v, causal=True, **hp, **params),
                  compiler_options=FAST_COMPILE)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    ref = jax.jit(lambda q, k, v: gla_reference(q, k, v, np.ones((1, t), bool), causal=True,
                                                **hp, **params))(
        *(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)))
    scale = np.abs(ref).max()
    assert scale > 1.0
    np.testing.assert_allclose(out, ref, atol=0.02 * scale)


def delta_recurrence(q, k, v, beta, g):
    """S_t = exp(g_t) (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T; o_t = S_t^T q_t."""
    def step(s, x):
        qt, kt, vt, bt, gt = x
        pred = jnp.einsum("bhd,bhde->bhe", kt, s)                  # k_t^T S_{t-1}
        s = jnp.exp(gt)[..., None, None] * (s - bt[..., None, None] * kt[..., :, None]
                                            * pred[..., None, :])
        s = s + bt[..., None, None] * kt[..., :, None] * vt[..., None, :]
        return s, jnp.einsum("bhd,bhde->bhe", qt, s)
    return scan_time(step, jnp.zeros(k.shape[:2] + (k.shape[-1], v.shape[-1]), q.dtype),
                     q, k, v, beta, g)


def delta_reference(q, k, v, mask, *, causal, output_norm, chunk_size, **params):
    beta, g = delta_mod.gates(k, **params)
    beta, g = jnp.where(mask[:, None], beta, 0.0), jnp.where(mask[:, None], g, 0.0)
    m4 = mask[:, None, :, None]
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    kt = jnp.where(m4, delta_mod.l2_normalize(kt), 0.0)
    vt = jnp.where(m4, vt, 0.0)
    out = both_ways(delta_recurrence, causal, delta_mod.l2_normalize(qt), kt, vt, beta, g)
    if output_norm:
        out = out / jnp.sqrt(jnp.mean(out * out, -1, keepdims=True) + gla_mod.RMS_EPS)
    return jnp.swapaxes(out, 1, 2)


@pytest.mark.parametrize("name,causal", [("deltanet", True), ("deltanet", False),
                                         ("gated_deltanet", True)])
def test_delta_chunkwise_equals_recurrence(name, causal):
    with jax.enable_x64(True):
        q, k, v, ct, mask = inputs(4)
        k = 2.0 * k
        params = state(name)
        if name == "gated_deltanet":   # decays from ~0.3 to ~1 per step
            params["decay_bias"] = params["decay_bias"] + 2.0
        hp = attention.hparams_for(name, {"output_norm": not causal})
        ref = grads_of(lambda q, k, v, p: delta_reference(q, k, v, mask, causal=causal, **hp,
                                                          **p), q, k, v, ct, params)
        for chunk in (4, 16) if causal else (8,):
            hp["chunk_size"] = chunk
            got = grads_of(lambda q, k, v, p: attention.get(name).fn(
                q, k, v, kv_mask=mask, causal=causal, **hp, **p), q, k, v, ct, params)
            assert_same(got, ref)
        np.testing.assert_array_equal(np.asarray(got[1][1])[1, -PADS:], 0.0)
        np.testing.assert_array_equal(np.asarray(got[1][2])[1, -PADS:], 0.0)
        if name == "gated_deltanet":
            assert np.abs(np.asarray(got[1][3]["decay_log_rate"])).max() > 1e-3


def test_gated_deltanet_with_every_decay_one_is_deltanet():
    with jax.enable_x64(True):
        q, k, v, _, mask = inputs(5)
        params = state("gated_deltanet")
        hp = attention.hparams_for("deltanet", {"chunk_size": 8})
        run = lambda name, p: jax.jit(lambda q, k, v: attention.get(name).fn(  # noqa: E731
            q, k, v, kv_mask=mask, causal=True, **hp, **p),
            compiler_options=FAST_COMPILE)(q, k, v)
        gated = run("gated_deltanet", {**params, "decay_log_rate": jnp.full((H,), -1e4)})
        plain = run("deltanet", {n: params[n] for n in ("beta_proj", "beta_bias")})
        np.testing.assert_allclose(gated, plain, atol=1e-12, rtol=1e-12)
        decayed = run("gated_deltanet", params)
        assert np.abs(np.asarray(decayed) - np.asarray(plain)).max() > 1e-3


def diff_numpy(q, k, v, mask, causal, lam, lambda_init, head_norm):
    """Differential attention in numpy float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    h = q.shape[-1] // 2
    keep = mask[:, None, None, :] & (np.tril(np.ones((q.shape[1],) * 2, bool)) if causal
                                     else True)

    def softmax_map(qh, kh):
        s = np.einsum("bqhd,bkhd->bhqk", qh, kh) / np.sqrt(h)
        s = np.where(keep, s, -np.inf)
        mx = np.max(s, -1, keepdims=True)
        e = np.where(keep, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0.0)
        den = e.sum(-1, keepdims=True)
        return e / np.where(den == 0, 1, den)
    out = np.einsum("bhqk,bkhd->bqhd", softmax_map(q[..., :h], k[..., :h])
                    - lam * softmax_map(q[..., h:], k[..., h:]), v)
    if head_norm:
        out = out / np.sqrt(np.mean(out ** 2, -1, keepdims=True) + 1e-5) * (1 - lambda_init)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_diff_equals_float64_reference(causal):
    q, k, v, _, mask = inputs(6, d=8, dtype=np.float32)
    mask[0, 0] = False                       # causal: query 0 of row 0 sees no key
    params = state("diff", d=8, dtype=jnp.float32, lambda_init=0.5)
    lam = float(np.exp(np.dot(params["lambda_q1"], params["lambda_k1"]))
                - np.exp(np.dot(params["lambda_q2"], params["lambda_k2"])) + 0.5)
    out = jax.jit(lambda q, k, v: attention.get("diff")(
        q, k, v, kv_mask=mask, causal=causal, lambda_init=0.5, **params))(q, k, v)
    ref = diff_numpy(q, k, v, mask, causal, lam, 0.5, True)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    if causal:
        np.testing.assert_array_equal(np.asarray(out)[0, 0], 0.0)


def test_diff_with_lambda_zero_is_dense_on_the_first_map():
    """lambda_init = 0 and lq = lk = 0: lambda = e^0 - e^0 + 0 = 0 exactly; with head_norm off
    the output is dense attention on (q1, k1, v) (head dim D/2, so the same 1/sqrt(D/2))."""
    q, k, v, _, mask = inputs(7, d=8, dtype=np.float32)
    zeros = {n: jnp.zeros((4,)) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
    @jax.jit
    def both(q, k, v):
        return [(attention.get("diff")(q, k, v, kv_mask=mask, causal=causal, lambda_init=0.0,
                                       head_norm=False, **zeros),
                 attention.get("dense")(q[..., :4], k[..., :4], v, kv_mask=mask, causal=causal))
                for causal in (True, False)]
    for out, dense in both(q, k, v):
        np.testing.assert_allclose(out, dense, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ Pallas


@pytest.mark.filterwarnings("ignore:.*interpret mode:UserWarning")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pallas_gla_equals_xla_in_interpret_mode(dtype):
    """gla's kernels, forward (states, output) and backward (reverse states, dQ/dK/dV, the
    gate's gradient from q dq - k dk), against the XLA form on a length of 19 with a padded
    row (partial chunks, padded keys): outputs and the gradients of q, k, v and the gate params.
    float64 (1e-9): causal at block_t 4 (five chunks) and bidirectional at block_t 8 (three);
    float32 (2e-5): causal, block_t 8."""
    with jax.enable_x64(dtype == np.float64):
        q, k, v, ct, mask = inputs(8, d=8, dtype=dtype)
        rng, r = np.random.default_rng(8), attention.hparams_for("gla", {})["gate_rank"]
        params = {"gate_down": rng.standard_normal((H, 8, r)).astype(dtype) / np.sqrt(8),
                  "gate_up": rng.standard_normal((H, r, 8)).astype(dtype) / np.sqrt(r),
                  "gate_bias": np.full((H, 8), -3.0, dtype)}   # (init_state's, minus 3)

        def run(q, k, v, params, impl, block_t, causal):
            def loss(q, k, v, params):
                out = attention.get("gla")(q, k, v, impl=impl, kv_mask=mask, causal=causal,
                                           chunk_size=4, output_norm=False, **params,
                                           **({"block_t": block_t} if block_t else {}))
                return jnp.sum(out * ct), out
            return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v,
                                                                                  params)

        run = jax.jit(run, static_argnums=(4, 5, 6), compiler_options=FAST_COMPILE)
        # (causal, kernel chunk): float64 causal at 4 and bidirectional at 8, float32 causal
        cases = ((True, 4), (False, 8)) if dtype == np.float64 else ((True, 8),)
        for causal, block_t in cases:
            want = run(q, k, v, params, "xla", None, causal)
            assert np.abs(np.asarray(want[1][3]["gate_bias"])).max() > 1e-3
            got = run(q, k, v, params, "pallas", block_t, causal)
            assert_same(got, want, tol=1e-9 if dtype == np.float64 else 2e-5)


@pytest.mark.filterwarnings("ignore:.*interpret mode:UserWarning")
def test_pallas_delta_equals_xla_in_interpret_mode():
    """gated_deltanet's kernels, forward (the per-chunk triangular solve by forward
    substitution, the state pass, the output) and backward (reverse state pass, per-chunk
    gradients of q, k, v, beta and the decays), against the XLA form (autodiff) in float64
    (block_t 4: five chunks, the last partial) on a length of 19 with a padded row: outputs
    and the gradients of q, k, v and every gate param."""
    with jax.enable_x64(True):
        q, k, v, ct, mask = inputs(9)
        k = 2.0 * k
        params = state("gated_deltanet")
        params["decay_bias"] = params["decay_bias"] + 2.0

        def run(q, k, v, params, impl, block_t):
            def loss(q, k, v, params):
                out = attention.get("gated_deltanet")(
                    q, k, v, impl=impl, kv_mask=mask, causal=True, chunk_size=8,
                    output_norm=False, **params, **({"block_t": block_t} if block_t else {}))
                return jnp.sum(out * ct), out
            return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v,
                                                                                  params)

        run = jax.jit(run, static_argnums=(4, 5), compiler_options=FAST_COMPILE)
        assert_same(run(q, k, v, params, "pallas", 4), run(q, k, v, params, "xla", None),
                    tol=1e-9)


@pytest.mark.filterwarnings("ignore:.*interpret mode:UserWarning")
def test_pallas_diff_equals_xla_in_interpret_mode():
    """diff through two flash calls against the XLA variant (outputs)."""
    q, k, v, _, mask = inputs(8, d=8, dtype=np.float32)
    params = state("diff", d=8, dtype=jnp.float32)
    run = jax.jit(lambda q, k, v, impl: attention.get("diff")(
        q, k, v, impl=impl, kv_mask=mask, causal=False, **params), static_argnums=3,
        compiler_options=FAST_COMPILE)
    assert_same(run(q, k, v, "pallas"), run(q, k, v, "xla"), tol=2e-5)


def test_pallas_gla_and_diff_lower_through_triton():
    """Forward and backward lower for a GPU from this CPU: gla's forward kernels (states,
    output) and backward kernels (reverse states, dQ/dK/dV), diff's two flash calls (forward,
    dQ, dK/dV each), gated_deltanet's forward kernels (per-chunk solve, states, output) and
    backward kernels (reverse states, per-chunk gradients)."""
    b, t, h, d = 1, 100, 2, 32
    x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)
    for name, calls in (("gla", 4), ("diff", 6), ("gated_deltanet", 5)):
        params = attention.get(name).init_state(jax.random.key(1), q_len=t, kv_len=t,
                                                num_heads=h, head_dim=d)["params"]

        def f(q, k, v, m):
            out, vjp = jax.vjp(lambda q, k, v: attention.get(name)(
                q, k, v, impl="pallas", kv_mask=m, causal=True, interpret=False, **params),
                q, k, v)
            return out, vjp(out)
        text = jax.jit(f).trace(x, x, x, mask).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == calls, name


def test_unit_lower_inverse_in_float32_with_correlated_keys():
    """The WY form's (I + L)^-1 by block doubling, c = 64 and 19 (padded to 32), at the hard
    case (nearly parallel unit keys, beta ~ 1: |L_ij| ~ 1): float32 within 1e-6 of the inverse."""
    for c in (64, 19):
        rng = np.random.default_rng(c)
        k = rng.standard_normal((c, 8)) * 0.1 + 1.0
        k /= np.linalg.norm(k, axis=1, keepdims=True)
        strict = np.tril(0.99 * k @ k.T, -1)
        got = jax.jit(delta_mod.unit_lower_inverse, compiler_options=FAST_COMPILE)(
            jnp.asarray(strict, jnp.float32))
        np.testing.assert_allclose(got, np.linalg.inv(np.eye(c) + strict), atol=1e-6)
