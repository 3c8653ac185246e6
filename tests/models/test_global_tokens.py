"""ETC global tokens (model.num_global_tokens with the longformer pattern) against a float64
numpy reference with the explicit mask: the prefix (CLS, global tokens) attends to every token
and is seen by every token; a long token sees its window and the prefix. With ETC's relative
position labels (model.relative_labels, models/etc.py): the same reference plus the key-side
label term, the blocked function against a float64 dense one, zero labels = the longformer path,
and compiled memory linear in the length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from models import build_model
from models import etc
from models.etc import global_local_attention, num_labels
from tests.attention.compile_options import FAST_COMPILE
from tests.models.reference import gelu as _gelu
from tests.models.reference import layer_norm as _ln
from tests.models.reference import linear as _lin
from tests.models.reference import param as _p
from training.validate import ConfigError, validate_config

pytestmark = pytest.mark.usefixtures("fast_compile")

T, G, W = 16, 2, 2
K = 1   # relative_max_distance: distance 2 in the window and among CLS + 2 globals is clipped


def etc_config(pooling="mean", **model):
    c = listops_config.get_config("longformer,tiny")
    c.attention.window = W
    c.model.update(num_global_tokens=G, num_layers=2, pooling=pooling, dropout_rate=0.0,
                   attention_dropout_rate=0.0, emb_dim=16, qkv_dim=16, mlp_dim=32)
    c.model.update(model)
    return c


def reference_labels(n, p, k):
    """ETC's labels written out: 0..2k clipped j - i (long-long, prefix-prefix), 2k + 1 long
    query -> prefix key, 2k + 2 prefix query -> long key."""
    lab = np.zeros((n, n), int)
    for i in range(n):
        for j in range(n):
            if (i < p) == (j < p):
                lab[i, j] = min(max(j - i, -k), k) + k
            else:
                lab[i, j] = 2 * k + 1 if j < p else 2 * k + 2
    return lab


def reference_states(enc, tokens, mask):
    b = tokens.shape[0]
    prefix = []
    if enc.pooling == "cls":
        prefix.append(np.broadcast_to(_p(enc.cls), (b, 1, enc.cls.shape[0])))
    prefix.append(np.broadcast_to(_p(enc.global_tokens), (b,) + enc.global_tokens.shape))
    x = np.concatenate(prefix + [_p(enc.embed.embedding)[tokens]], 1)
    p = x.shape[1] - tokens.shape[1]
    assert p == enc.num_prefix
    x = x + _p(enc.pos)[: x.shape[1]]
    kv = np.concatenate([np.ones((b, p), bool), mask], 1)
    n = x.shape[1]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = ((np.abs(i - j) <= W) | (i < p) | (j < p))[None, None] & kv[:, None, None, :]
    for blk in enc.blocks:
        att = blk.attention
        nh, hd = att.num_heads, att.head_dim
        h = _ln(x, blk.norm1)
        split = lambda y: y.reshape(b, n, nh, hd).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(_lin(h, att.query)), split(_lin(h, att.key)), split(_lin(h, att.value))
        s = q @ k.transpose(0, 1, 3, 2)
        if hasattr(att, "relative"):                       # q_i . a_label(i, j)
            a = _p(att.relative)[reference_labels(n, p, att.max_distance)]  # [n, n, hd]
            s = s + np.einsum("bhid,ijd->bhij", q, a)
        s = np.where(allowed, s / np.sqrt(hd), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        y = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, nh * hd)
        x = x + _lin(y, att.out)
        x = x + _lin(_gelu(_lin(_ln(x, blk.norm2), blk.mlp_in)), blk.mlp_out)
    return _ln(x, enc.norm)


@pytest.mark.parametrize("pooling,relative", [("mean", False), ("cls", False), ("cls", True)])
def test_global_tokens_match_float64_masked_reference(pooling, relative):
    c = etc_config(pooling, relative_labels=relative, relative_max_distance=K)
    model = build_model(c, num_classes=10, vocab_size=16, max_len=T)
    enc = model.encoder
    assert hasattr(enc.blocks[0].attention, "relative") == relative
    assert enc.num_prefix == G + (pooling == "cls")
    assert enc.blocks[0].attention.hparams["num_global"] == enc.num_prefix
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 16, (2, T))
    mask = np.arange(T)[None] < np.array([[T - 5], [T]])
    # one compile instead of eager ops (several times faster here)
    run = nnx.jit(lambda e, tokens, mask: (*e.states(tokens, mask), e(tokens, mask)))
    got, got_mask, pooled = run(enc, jnp.asarray(tokens), jnp.asarray(mask))
    want = reference_states(enc, tokens, mask)
    real = np.asarray(got_mask)[..., None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)
    pooled = np.asarray(pooled)
    if pooling == "mean":                      # the global tokens are not pooled
        w = mask[..., None]
        np.testing.assert_allclose(pooled, (want[:, G:] * w).sum(1) / w.sum(1), atol=2e-5)
    else:
        np.testing.assert_allclose(pooled, want[:, 0], atol=2e-5)


def test_global_tokens_need_longformer():
    c = listops_config.get_config("local,tiny")
    c.model.num_global_tokens = 2
    with pytest.raises(ConfigError, match="num_global_tokens=2"):
        validate_config(c)
    with pytest.raises(ValueError, match="global positions"):
        build_model(c, num_classes=10, vocab_size=16, max_len=64)


def dense_relative_reference(q, k, v, rel, mask, *, causal, window, p, kmax):
    """float64 numpy: every pair's logit q_i . (k_j + a_label) / sqrt(d) under the explicit
    global-local mask; a query without keys gets zeros."""
    b, t, h, d = q.shape
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (np.abs(i - j) <= window) | (i < p) | (j < p)
    if causal:
        allowed = allowed & (j <= i)
    allowed = allowed[None, None] & mask[:, None, None, :]
    a = rel[reference_labels(t, p, kmax)]                              # [T, T, D]
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    s = (qh @ kh.transpose(0, 1, 3, 2) + np.einsum("bhid,ijd->bhij", qh, a)) / np.sqrt(d)
    s = np.where(allowed, s, -np.inf)
    top = s.max(-1, keepdims=True)
    w = np.where(allowed, np.exp(s - np.where(np.isfinite(top), top, 0)), 0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    return (w @ vh).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("causal,computed_labels", [(False, False), (True, True)])
def test_relative_labels_function_equals_float64_dense_reference(causal, computed_labels,
                                                                 monkeypatch):
    """Blocked (band blocks of 16, length 21 padded to 32) against the dense float64 pairs:
    3 prefix positions, window 3, labels clipped at 2, the second sequence padded by 6.
    computed_labels: the labels computed by XLA (as for long sequences), not constants."""
    if computed_labels:
        monkeypatch.setattr(etc, "STATIC_MASK_LIMIT", 0)
    b, t, h, d, w, p, kmax = 2, 21, 2, 4, 3, 3, 2
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(b, t, h, d)) for _ in range(3))
    rel = rng.normal(size=(num_labels(kmax), d))
    mask = np.arange(t)[None] < np.array([[t], [t - 6]])
    fn = jax.jit(lambda *a: global_local_attention(*a[:4], kv_mask=a[4], causal=causal,
                                                   window=w, num_prefix=p, max_distance=kmax))
    with jax.enable_x64(True):
        got = fn(*(jnp.asarray(x) for x in (q, k, v, rel, mask)))
        assert got.dtype == jnp.float64
        got = np.asarray(got)
    want = dense_relative_reference(q, k, v, rel, mask, causal=causal, window=w, p=p, kmax=kmax)
    real = mask[:, :, None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-12)


def test_zero_labels_equal_the_longformer_path():
    """Label table zero: the layer equals itself run through MultiHeadAttention's call, i.e.
    the longformer variant with the model's num_global and the same projections (in training
    mode with attention dropout: the same draws too)."""
    from models.multihead import MultiHeadAttention

    model = build_model(etc_config("cls", attention_dropout_rate=0.2, relative_labels=True),
                        num_classes=10, vocab_size=16, max_len=T)
    att = model.encoder.blocks[0].attention
    att.relative[...] = jnp.zeros_like(att.relative[...])
    p = model.encoder.num_prefix
    x = jax.random.normal(jax.random.key(1), (2, p + T, 16))
    mask = jnp.asarray(np.arange(p + T)[None] < np.array([[p + T - 5], [p + T]]))

    def layer(call):
        return nnx.jit(lambda a, x, m: call(a, x, m, train=True, rngs=nnx.Rngs(dropout=3)))
    relative = layer(etc.RelativeGlobalLocalAttention.__call__)
    got = relative(att, x, mask)
    want = layer(MultiHeadAttention.__call__)(att, x, mask)
    real = np.asarray(mask)[..., None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5)
    # the labels do enter (equal labels would only add a constant to each row)
    att.relative[...] = jax.random.normal(jax.random.key(0), att.relative.shape)
    moved = relative(att, x, mask)
    assert not np.allclose(np.where(real, moved, 0), np.where(real, want, 0), atol=1e-3)


def test_relative_labels_memory_linear_in_length():
    """Forward + backward compiled at n and 4n: temp bytes grow ~4x (dense scores: 16x), and
    no array of n x n elements anywhere (traced at 8n)."""
    from tools.compiled import compile_fn, largest_array, memory

    kw = dict(window=16, num_prefix=4, max_distance=4)

    def program(n):
        def f(q, k, v, rel, mask):
            def loss(q, k, v, rel):
                return jnp.sum(global_local_attention(q, k, v, rel, kv_mask=mask, **kw) ** 2)
            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, rel)
        x = jax.ShapeDtypeStruct((1, n, 2, 16), jnp.float32)
        return f, (x, x, x, jax.ShapeDtypeStruct((num_labels(4), 16), jnp.float32),
                   jax.ShapeDtypeStruct((1, n), jnp.bool_))

    temp = [memory(compile_fn(*program(n), compiler_options=FAST_COMPILE)[0])["temp_bytes"]
            for n in (256, 1024)]
    assert 0.7 * 4 <= temp[1] / temp[0] <= 1.25 * 4, temp
    n = 2048
    f, args = program(n)
    assert largest_array(jax.make_jaxpr(f)(*args).jaxpr) < n * n / 2


def test_relative_labels_need_global_tokens():
    c = etc_config(relative_labels=True, num_global_tokens=0)
    with pytest.raises(ConfigError, match="relative_labels"):
        validate_config(c)
    with pytest.raises(ValueError, match="num_global_tokens > 0"):
        build_model(c, num_classes=10, vocab_size=16, max_len=T)
