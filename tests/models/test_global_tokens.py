"""ETC global tokens (model.num_global_tokens with the longformer pattern) against a float64
numpy reference with the explicit mask: the prefix (CLS, global tokens) attends to every token
and is seen by every token; a long token sees its window and the prefix."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import listops as listops_config
from models import build_model
from tests.models.reference import gelu as _gelu
from tests.models.reference import layer_norm as _ln
from tests.models.reference import linear as _lin
from tests.models.reference import param as _p
from training.validate import ConfigError, validate_config

pytestmark = pytest.mark.usefixtures("fast_compile")

T, G, W = 16, 2, 2


def etc_config(pooling="mean", **model):
    c = listops_config.get_config("longformer,tiny")
    c.attention.window = W
    c.model.update(num_global_tokens=G, num_layers=2, pooling=pooling, dropout_rate=0.0,
                   attention_dropout_rate=0.0, emb_dim=16, qkv_dim=16, mlp_dim=32)
    c.model.update(model)
    return c


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
        s = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        y = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, nh * hd)
        x = x + _lin(y, att.out)
        x = x + _lin(_gelu(_lin(_ln(x, blk.norm2), blk.mlp_in)), blk.mlp_out)
    return _ln(x, enc.norm)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_global_tokens_match_float64_masked_reference(pooling):
    model = build_model(etc_config(pooling), num_classes=10, vocab_size=16, max_len=T)
    enc = model.encoder
    assert enc.num_prefix == G + (pooling == "cls")
    assert enc.blocks[0].attention.hparams["num_global"] == enc.num_prefix
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 16, (2, T))
    mask = np.arange(T)[None] < np.array([[T - 5], [T]])
    got, got_mask = enc.states(jnp.asarray(tokens), jnp.asarray(mask))
    want = reference_states(enc, tokens, mask)
    real = np.asarray(got_mask)[..., None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)
    pooled = np.asarray(enc(jnp.asarray(tokens), jnp.asarray(mask)))
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
