"""Transformer-XL (models/recurrent.py, model.recurrence="xl") against a float64 numpy
reference of the paper's formula, segment independence at mem_len=0, the stopped memory
gradient, causality across segments, config refusals, and a few LM training steps."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm as lm_config
from models import build_model
from tests.models.reference import gelu as _gelu
from tests.models.reference import layer_norm as _ln
from tests.models.reference import linear as _lin
from tests.models.reference import param as _p
from training.validate import ConfigError, validate_config

pytestmark = pytest.mark.usefixtures("fast_compile")

B, T, S = 2, 24, 8
VOCAB = 16


def xl_config(mem_len=12, **model):
    c = lm_config.get_config("dense,tiny")
    c.model.update(recurrence="xl", segment_len=S, mem_len=mem_len, num_layers=2, emb_dim=16,
                   qkv_dim=16, mlp_dim=32, num_heads=2, dropout_rate=0.0,
                   attention_dropout_rate=0.0)
    c.model.update(model)
    return c


def build(c, causal=True):
    return build_model(c, num_classes=VOCAB, vocab_size=VOCAB, max_len=T, head="tokens",
                       causal=causal)


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (B, T))
    mask = np.arange(T)[None] < np.array([[T - 5], [T]])    # a padded tail in example 0
    return tokens, mask


# ---- float64 reference of the paper's formula (memory of true length, no zero padding) ----

def _sinusoid(d, dim):
    inv = 1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)
    return np.concatenate([np.sin(d * inv), np.cos(d * inv)])


def _ref_layer(blk, h, mem, mask, mem_mask, causal):
    att = blk.attention
    nh, hd = att.num_heads, att.head_dim
    b, t, e = h.shape
    m = mem.shape[1]
    hn, cat = _ln(h, blk.norm1), _ln(np.concatenate([mem, h], 1), blk.norm1)
    q = _lin(hn, att.query).reshape(b, t, nh, hd)
    k = _lin(cat, att.key).reshape(b, m + t, nh, hd)
    v = _lin(cat, att.value).reshape(b, m + t, nh, hd)
    u, vb, wr = _p(att.u), _p(att.v), _p(att.rel.kernel)
    kv_mask = np.concatenate([mem_mask, mask], 1)
    out = np.zeros((b, t, nh, hd))
    for bi in range(b):
        for hi in range(nh):
            for i in range(t):
                scores = np.full(m + t, -np.inf)
                for j in range(m + t):
                    dist = (m + i) - j
                    if not kv_mask[bi, j] or (causal and dist < 0):
                        continue
                    r = (_sinusoid(dist, e) @ wr).reshape(nh, hd)[hi]
                    scores[j] = ((q[bi, i, hi] + u[hi]) @ k[bi, j, hi]
                                 + (q[bi, i, hi] + vb[hi]) @ r) / np.sqrt(hd)
                if np.isinf(scores).all():
                    continue
                w = np.exp(scores - scores.max())
                out[bi, i, hi] = (w / w.sum()) @ v[bi, :, hi]
    h = h + _lin(out.reshape(b, t, nh * hd), att.out)
    return h + _lin(_gelu(_lin(_ln(h, blk.norm2), blk.mlp_in)), blk.mlp_out)


def reference_states(enc, tokens, mask, causal=True):
    x = _p(enc.embed.embedding)[tokens]
    mems = [np.zeros((B, 0, x.shape[-1]))] * len(enc.blocks)
    mem_mask = np.zeros((B, 0), bool)
    outs = []
    for s0 in range(0, T, S):
        h, m = x[:, s0:s0 + S], mask[:, s0:s0 + S]
        new = []
        for blk, mem in zip(enc.blocks, mems):
            new.append(np.concatenate([mem, h], 1)[:, -enc.mem_len:] if enc.mem_len else
                       mem)
            h = _ref_layer(blk, h, mem, m, mem_mask, causal)
        mems = new
        if enc.mem_len:
            mem_mask = np.concatenate([mem_mask, m], 1)[:, -enc.mem_len:]
        outs.append(h)
    return _ln(np.concatenate(outs, 1), enc.norm)


@pytest.mark.parametrize("mem_len, causal", [(12, True), (0, True), (12, False)])
def test_xl_matches_float64_reference(mem_len, causal):
    """Each segment's output equals the XL formula over [memory (true length, up to 12 of
    the previous states: it spans one and a half segments); segment]; mem_len=0: each segment
    alone; bidirectional: the whole segment and the memory visible."""
    model = build(xl_config(mem_len=mem_len), causal=causal)
    tokens, mask = _inputs()
    got, _ = model.encoder.states(jnp.asarray(tokens), jnp.asarray(mask))
    want = reference_states(model.encoder, tokens, mask, causal=causal)
    real = mask[..., None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)


def test_mem_len_zero_reads_segments_independently():
    """mem_len=0: the states of a segment equal those of the segment fed alone."""
    model = build(xl_config(mem_len=0))
    tokens, mask = _inputs()
    whole, _ = model.encoder.states(jnp.asarray(tokens), jnp.asarray(mask))
    alone, _ = model.encoder.states(jnp.asarray(tokens[:, S:2 * S]), jnp.asarray(mask[:, S:2 * S]))
    np.testing.assert_allclose(whole[:, S:2 * S], alone, atol=1e-5)


def test_memory_carries_context_but_no_gradient():
    """Segment 2's outputs depend on segment 1's tokens (through the memory) in the forward
    pass, but the gradient of a loss on segment 2 does not reach segment 1's embeddings."""
    model = build(xl_config(mem_len=S))
    rng = np.random.default_rng(1)
    tokens = np.concatenate([rng.integers(0, 8, (B, S)), rng.integers(8, 16, (B, 2 * S))], 1)
    mask = np.ones((B, T), bool)
    x = jnp.asarray(tokens)

    def seg2(m, x):
        return m.encoder.states(x, jnp.asarray(mask))[0][:, S:2 * S]

    other = x.at[:, :S].set((x[:, :S] + 1) % 8)
    assert not np.allclose(seg2(model, x), seg2(model, other), atol=1e-4)
    grads = nnx.jit(lambda m, x: nnx.grad(lambda mm: jnp.sum(jnp.sin(seg2(mm, x))))(m))(
        model, x)
    emb = np.asarray(grads["encoder"]["embed"]["embedding"][...])
    assert np.abs(emb[8:]).max() > 1e-4                 # segment 2's own tokens: a gradient
    np.testing.assert_array_equal(emb[:8], 0.0)         # segment 1's tokens: none


def test_causal_across_segments():
    """Changing token p changes no output before p (in its segment or through the memory of
    later ones) and changes outputs at p and after."""
    model = build(xl_config(mem_len=12))
    tokens, _ = _inputs()
    mask = np.ones((B, T), bool)
    base = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    for p in (5, 13):
        changed = tokens.copy()
        changed[:, p] = (changed[:, p] + 3) % VOCAB
        out = np.asarray(model(jnp.asarray(changed), jnp.asarray(mask)))
        np.testing.assert_allclose(out[:, :p], base[:, :p], atol=1e-6)
        assert not np.allclose(out[:, p:], base[:, p:], atol=1e-4)


def test_bad_combinations_are_config_errors():
    for arg, fields, match in [
            ("local,tiny", {}, "attention.name='local'"),
            ("dense,tiny", {"segment_len": 0}, "segment_len >= 1"),
            ("dense,tiny", {"pooling": "cls"}, "pooling='mean'"),
            ("dense,tiny", {"reversible": True}, "reversible"),
            ("dense,tiny", {"recurrence": "rnn"}, "model.recurrence")]:
        c = lm_config.get_config(arg)
        c.model.update(recurrence="xl", segment_len=16, mem_len=16)
        c.model.update(fields)
        with pytest.raises(ConfigError, match=match):
            validate_config(c)
    c = lm_config.get_config("local,tiny")
    c.model.recurrence = "xl"
    with pytest.raises(ValueError, match="not supported"):
        build_model(c, num_classes=VOCAB, vocab_size=VOCAB, max_len=64, head="tokens",
                    causal=True)


def test_lm_trains_a_few_steps_with_xl(tmp_path):
    """train.py's loop on the lm task (a small tree of .py files) with model.recurrence=xl."""
    import train

    root = tmp_path / "src"
    for i in range(12):
        path = root / f"pkg{i % 3}" / f"mod_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {i}\n" + "def f(x):\n    return x * %d\n" % i * 20)
    c = lm_config.get_config("dense,tiny,len=32")
    c.model.recurrence = "xl"
    c.data.data_dir = str(root)
    c.data.workers = 1
    c.data.batch_size = 4
    c.data.eval_batch_size = 4
    c.data.validation_fraction = 0.2
    c.data.test_fraction = 0.2
    c.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2, eval_examples=8)
    assert (c.model.segment_len, c.model.mem_len) == (8, 8)
    results = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert results["steps"] == 2 and np.isfinite(results["test_loss"])
    with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r.get("split") == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if r.get("split") == "train")


# ---- Compressive Transformer: memory bookkeeping against a slow per-state reference ----

def _slow_memories(x, mask, seg, mem_len, cmem_len, rate):
    """Per example, state by state: a FIFO of mem_len (value, real) entries, starting with
    empty (unreal) ones; each segment pushes its states and pops the oldest ones, which are cut
    in groups of `rate` (mean of the real states; real if one is) and pushed into a FIFO of
    cmem_len compressed entries. -> per segment (mem, mem_real, cmem, cmem_real)."""
    e = x.shape[-1]
    out = []
    fifos = [[(np.zeros(e), False)] * mem_len for _ in range(x.shape[0])]
    cfifos = [[(np.zeros(e), False)] * cmem_len for _ in range(x.shape[0])]
    for s0 in range(0, x.shape[1], seg):
        for b in range(x.shape[0]):
            fifo = fifos[b] + [(x[b, t], bool(mask[b, t])) for t in range(s0, s0 + seg)]
            gone, fifos[b] = fifo[:len(fifo) - mem_len], fifo[len(fifo) - mem_len:]
            for g in range(0, len(gone), rate):
                group = gone[g:g + rate]
                real = [v for v, r in group if r]
                cfifos[b].append((np.mean(real, 0) if real else np.zeros(e), bool(real)))
            cfifos[b] = cfifos[b][len(cfifos[b]) - cmem_len:]
        out.append(tuple(np.array([[item[k] for item in f] for f in fifos_])
                         for fifos_ in (fifos, cfifos) for k in (0, 1)))
    return out


def test_compressive_memory_bookkeeping_is_exact():
    """Layer 0's memory and compressed memory after each of 4 segments (its inputs are the
    embeddings) equal the slow reference, values and masks, padded tail included."""
    t = 32
    c = xl_config(mem_len=12, recurrence="compressive", cmem_len=6, compression_rate=4)
    model = build_model(c, num_classes=VOCAB, vocab_size=VOCAB, max_len=t, head="tokens",
                        causal=True)
    enc = model.encoder
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, VOCAB, (B, t))
    mask = np.arange(t)[None] < np.array([[t - 11], [t]])
    x = np.asarray(enc.embed(jnp.asarray(tokens)))
    want = _slow_memories(x.astype(np.float64), mask, S, 12, 6, 4)
    memory = enc.initial_memory(B)
    for i, (mem, mem_real, cmem, cmem_real) in enumerate(want):
        _, memory = enc.segment(jnp.asarray(x[:, i * S:(i + 1) * S]),
                                jnp.asarray(mask[:, i * S:(i + 1) * S]), memory)
        mems, mem_mask, cmems, cmem_mask = memory
        np.testing.assert_array_equal(mem_mask, mem_real)
        np.testing.assert_array_equal(cmem_mask, cmem_real)
        np.testing.assert_allclose(mems[0], mem, atol=1e-6)
        np.testing.assert_allclose(cmems[0], cmem, atol=1e-6)
    assert np.asarray(cmem_mask).sum() == 2 * 6 - 2     # compressed slots filled by then
    # the whole forward pass runs over [compressed; memory; segment] and stays causal
    base = np.asarray(model(jnp.asarray(tokens), jnp.ones((B, t), bool)))
    changed = tokens.copy()
    changed[:, 20] = (changed[:, 20] + 1) % VOCAB
    out = np.asarray(model(jnp.asarray(changed), jnp.ones((B, t), bool)))
    np.testing.assert_allclose(out[:, :20], base[:, :20], atol=1e-6)


def test_compressive_config_errors():
    c = lm_config.get_config("dense,tiny")
    c.model.update(recurrence="compressive", segment_len=16, mem_len=16, cmem_len=8,
                   compression_rate=3)
    with pytest.raises(ConfigError, match="must divide"):
        validate_config(c)
    c.model.update(compression_rate=4, compression="conv")
    with pytest.raises(ConfigError, match="model.compression"):
        validate_config(c)
