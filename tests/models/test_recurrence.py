"""Transformer-XL (models/recurrent.py, model.recurrence="xl") against a float64 numpy
reference of the paper's formula, segment independence at mem_len=0, the stopped memory
gradient, causality across segments, config refusals, and a few LM training steps; XL with a
registered variant (local) against a float64 reference over the window [memory; segment] and
against the plain encoder at mem_len=0; the Compressive Transformer's memory bookkeeping (mean
and strided-convolution compression), its convolution, and its attention-reconstruction loss
(gradient only into the convolution; falls in a short run of the training loop's step)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm as lm_config
from models import build_model, pop_aux_losses
from models.encoder import sinusoidal_positions
from models.recurrent import compress_conv
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


def reference_states(enc, tokens, mask, causal=True, layer=_ref_layer, padded_memory=False):
    """padded_memory: the memory is mem_len slots from the start (empty ones masked), as the
    encoder keeps it: window positions count these slots."""
    x = _p(enc.embed.embedding)[tokens]
    start = enc.mem_len if padded_memory else 0
    mems = [np.zeros((B, start, x.shape[-1]))] * len(enc.blocks)
    mem_mask = np.zeros((B, start), bool)
    outs = []
    for s0 in range(0, T, S):
        h, m = x[:, s0:s0 + S], mask[:, s0:s0 + S]
        new = []
        for blk, mem in zip(enc.blocks, mems):
            new.append(np.concatenate([mem, h], 1)[:, -enc.mem_len:] if enc.mem_len else
                       mem)
            h = layer(blk, h, mem, m, mem_mask, causal)
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
    variants = [tokens]
    for p in (5, 13):
        changed = tokens.copy()
        changed[:, p] = (changed[:, p] + 3) % VOCAB
        variants.append(changed)
    everything = np.concatenate(variants)                    # one call for the three
    outs = np.asarray(model(jnp.asarray(everything), jnp.ones(everything.shape, bool)))
    base = outs[:B]
    for i, p in enumerate((5, 13)):
        out = outs[(i + 1) * B:(i + 2) * B]
        np.testing.assert_allclose(out[:, :p], base[:, :p], atol=1e-6)
        assert not np.allclose(out[:, p:], base[:, p:], atol=1e-4)


def test_bad_combinations_are_config_errors():
    for arg, fields, match in [
            ("axial,tiny", {}, "attention.name='axial' needs a 2D grid"),
            ("dense,tiny", {"segment_len": 0}, "segment_len >= 1"),
            ("dense,tiny", {"pooling": "cls"}, "pooling='mean'"),
            ("dense,tiny", {"reversible": True}, "reversible"),
            ("dense,tiny", {"recurrence": "rnn"}, "model.recurrence")]:
        c = lm_config.get_config(arg)
        c.model.update(recurrence="xl", segment_len=16, mem_len=16)
        c.model.update(fields)
        with pytest.raises(ConfigError, match=match):
            validate_config(c)
    c = lm_config.get_config("dense,tiny")
    c.attention.name = "local2d"
    c.model.update(recurrence="xl", segment_len=16)
    with pytest.raises(ValueError, match="needs a 2D grid"):
        build_model(c, num_classes=VOCAB, vocab_size=VOCAB, max_len=64, head="tokens",
                    causal=True)


def test_lm_trains_a_few_steps_with_xl(tmp_path):
    """train.py's loop on the lm task (a small tree of .py files) with
    model.recurrence=compressive (XL plus the compressed memory) and the convolution: the
    reconstruction loss is logged next to the loss."""
    import train

    root = tmp_path / "src"
    for i in range(12):
        path = root / f"pkg{i % 3}" / f"mod_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {i}\n" + "def f(x):\n    return x * %d\n" % i * 20)
    c = lm_config.get_config("dense,tiny,len=32")
    c.model.update(recurrence="compressive", compression="conv")
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
    assert all(np.isfinite(r["loss"]) and r["recon_loss"] > 0 for r in rows
               if r.get("split") == "train")


# ---- XL with a registered variant (local) over the window [memory; segment] ----

W = 3                                           # local window: |i - j| <= 3 slots


def _ref_local_layer(blk, h, mem, mask, mem_mask, causal):
    """The block with local attention on the window [mem; h] (float64): LN, the window's
    sinusoids when the block adds them, q/k/v over the whole window, keys |p - j| <= W (and
    j <= p when causal) among the real slots, the segment's rows kept."""
    att = blk.attention
    nh, hd = att.num_heads, att.head_dim
    b, t, e = h.shape
    n = mem.shape[1] + t
    win = _ln(np.concatenate([mem, h], 1), blk.norm1)
    if blk.window_positions:
        win = win + sinusoidal_positions(n, e).astype(np.float64)
    q, k, v = (_lin(win, lin).reshape(b, n, nh, hd) for lin in (att.query, att.key, att.value))
    p, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (np.abs(p - j) <= W) & ((j <= p) if causal else True)
    allowed = allowed[None, None] & np.concatenate([mem_mask, mask], 1)[:, None, None, :]
    scores = np.where(allowed, np.einsum("bphd,bjhd->bhpj", q, k) / np.sqrt(hd), -1e300)
    wts = np.where(allowed, np.exp(scores - scores.max(-1, keepdims=True)), 0.0)
    wts = wts / np.maximum(wts.sum(-1, keepdims=True), 1e-300)     # rows without keys: 0
    out = np.einsum("bhpj,bjhd->bphd", wts, v)[:, n - t:]
    h = h + _lin(out.reshape(b, t, nh * hd), att.out)
    return h + _lin(_gelu(_lin(_ln(h, blk.norm2), blk.mlp_in)), blk.mlp_out)


def _jit_states(enc, tokens, mask):
    """enc.states compiled (cheaper than op-by-op for the banded local attention)."""
    return np.asarray(nnx.jit(lambda e, t, m: e.states(t, m)[0])(enc, jnp.asarray(tokens),
                                                                 jnp.asarray(mask)))


def local_config(mem_len=12, **model):
    c = xl_config(mem_len=mem_len, **model)
    c.attention.name = "local"
    c.attention.window = W
    return c


def test_xl_local_matches_float64_window_reference_and_is_causal():
    """XL with attention 'local' (window sinusoids, causal): each segment's output equals local
    attention run on [memory (12 slots, empty ones masked); segment] with the segment's rows
    kept, the memory cached as in XL (float64 reference). Changing token 13 (second segment)
    changes no output before it, and changes later ones (in later segments via the memory)."""
    model = build(local_config())
    tokens, mask = _inputs()
    changed = tokens.copy()
    changed[:, 13] = (changed[:, 13] + 3) % VOCAB
    both = _jit_states(model.encoder, np.concatenate([tokens, changed]),
                       np.concatenate([mask, mask]))
    got, other = np.asarray(both[:B]), np.asarray(both[B:])
    want = reference_states(model.encoder, tokens, mask, causal=True, layer=_ref_local_layer,
                            padded_memory=True)
    real = mask[..., None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)
    np.testing.assert_allclose(other[:, :13], got[:, :13], atol=1e-6)
    assert not np.allclose(other[:, 13:], got[:, 13:], atol=1e-4)
    assert not np.allclose(other[:, 2 * S:], got[:, 2 * S:], atol=1e-4)


def test_xl_local_mem_len_zero_is_the_plain_encoder_per_segment():
    """mem_len=0, xl_positions='none', bidirectional: XL-local's states equal those of the
    plain encoder with local attention (same weights, its position table zeroed) fed each
    segment alone."""
    xl = build(local_config(mem_len=0, xl_positions="none", num_layers=1), causal=False).encoder
    c = local_config(mem_len=0, num_layers=1)
    c.model.update(recurrence="none", pooling="mean")
    plain = build_model(c, num_classes=VOCAB, vocab_size=VOCAB, max_len=S, head="tokens",
                        causal=False).encoder
    plain.pos[...] = jnp.zeros_like(plain.pos[...])
    for name in ("embed", "norm"):
        nnx.update(getattr(plain, name), nnx.state(getattr(xl, name)))
    for pb, xb in zip(plain.blocks, xl.blocks):
        for name in ("norm1", "attention", "norm2", "mlp_in", "mlp_out"):
            nnx.update(getattr(pb, name), nnx.state(getattr(xb, name)))
    tokens, mask = _inputs()
    whole = _jit_states(xl, tokens, mask)
    alone = _jit_states(plain, tokens.reshape(-1, S), mask.reshape(-1, S))
    real = mask[..., None]
    np.testing.assert_allclose(np.where(real, whole, 0),
                               np.where(real, np.reshape(alone, whole.shape), 0), atol=1e-5)


# ---- Compressive Transformer: memory bookkeeping against a slow per-state reference ----

def _mean_group(states, reals):
    real = [v for v, r in zip(states, reals) if r]
    return np.mean(real, 0) if real else np.zeros(states[0].shape)


def _conv_group(kernel, bias):
    """The strided convolution of one group: sum_r x_r @ K[r] + b, padded states as zeros."""
    def compress(states, reals):
        return sum((v if r else 0 * v) @ kernel[i] for i, (v, r) in enumerate(
            zip(states, reals))) + bias
    return compress


def _slow_memories(x, mask, seg, mem_len, cmem_len, rate, compress=_mean_group):
    """Per example, state by state: a FIFO of mem_len (value, real) entries, starting with
    empty (unreal) ones; each segment pushes its states and pops the oldest ones, which are cut
    in groups of `rate` (compress(values, reals); real if one is) and pushed into a FIFO of
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
                values, reals = zip(*gone[g:g + rate])
                cfifos[b].append((compress(values, reals), any(reals)))
            cfifos[b] = cfifos[b][len(cfifos[b]) - cmem_len:]
        out.append(tuple(np.array([[item[k] for item in f] for f in fifos_])
                         for fifos_ in (fifos, cfifos) for k in (0, 1)))
    return out


@pytest.mark.parametrize("compression", ["mean", "conv"])
def test_compressive_memory_bookkeeping_is_exact(compression):
    """Layer 0's memory and compressed memory after each of 4 segments (its inputs are the
    embeddings) equal the slow reference, values and masks, padded tail included, for mean
    pooling and for the layer's strided convolution."""
    t = 32
    c = xl_config(mem_len=12, recurrence="compressive", cmem_len=6, compression_rate=4,
                  compression=compression, num_layers=1)
    model = build_model(c, num_classes=VOCAB, vocab_size=VOCAB, max_len=t, head="tokens",
                        causal=True)
    enc = model.encoder
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, VOCAB, (B, t))
    mask = np.arange(t)[None] < np.array([[t - 11], [t]])
    x = np.asarray(enc.embed(jnp.asarray(tokens)))
    conv = enc.blocks[0].compressor
    compress = (_mean_group if compression == "mean"
                else _conv_group(_p(conv.kernel), _p(conv.bias)))
    want = _slow_memories(x.astype(np.float64), mask, S, 12, 6, 4, compress)
    memory = enc.initial_memory(B)
    for i, (mem, mem_real, cmem, cmem_real) in enumerate(want):
        _, memory, _ = enc.segment(jnp.asarray(x[:, i * S:(i + 1) * S]),
                                   jnp.asarray(mask[:, i * S:(i + 1) * S]), memory)
        mems, mem_mask, cmems, cmem_mask = memory
        np.testing.assert_array_equal(mem_mask, mem_real)
        np.testing.assert_array_equal(cmem_mask, cmem_real)
        np.testing.assert_allclose(mems[0], mem, atol=1e-6)
        np.testing.assert_allclose(cmems[0], cmem, atol=1e-5)
    assert np.asarray(cmem_mask).sum() == 2 * 6 - 2     # compressed slots filled by then
    if compression == "conv":
        return
    # the whole forward pass runs over [compressed; memory; segment] and stays causal
    base = np.asarray(model(jnp.asarray(tokens), jnp.ones((B, t), bool)))
    changed = tokens.copy()
    changed[:, 20] = (changed[:, 20] + 1) % VOCAB
    out = np.asarray(model(jnp.asarray(changed), jnp.ones((B, t), bool)))
    np.testing.assert_allclose(out[:, :20], base[:, :20], atol=1e-6)


def test_conv_compression_equals_numpy_strided_conv():
    """compress_conv: slot j = sum_r x[j * rate + r] @ K[r] + b with padded states as zeros
    (a slow numpy loop), real where its group has a real state."""
    rate, n, e = 3, 12, 5
    conv = nnx.Conv(e, e, kernel_size=(rate,), strides=(rate,), padding="VALID",
                    rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, n, e)).astype(np.float32)
    mask = rng.random((2, n)) < 0.6
    mask[0, :rate] = False                                  # one group without a real state
    got, got_mask = compress_conv(conv, jnp.asarray(x), jnp.asarray(mask), rate)
    kernel, bias = _p(conv.kernel), _p(conv.bias)
    want = np.zeros((2, n // rate, e))
    for b in range(2):
        for j in range(n // rate):
            want[b, j] = bias
            for r in range(rate):
                if mask[b, j * rate + r]:
                    want[b, j] += x[b, j * rate + r].astype(np.float64) @ kernel[r]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got_mask, mask.reshape(2, -1, rate).any(-1))


def conv_config(**model):
    return xl_config(mem_len=8, recurrence="compressive", cmem_len=4, compression_rate=2,
                     compression="conv", **model)


def test_reconstruction_loss_trains_only_the_compressor_and_falls():
    """The gradient of the reconstruction loss reaches every layer's convolution and no other
    parameter (exact zeros, layer 1's loss included: its inputs are layer 0's outputs); the
    task's loss does not reach the convolution (the compressed memory enters with its gradient
    stopped). Adam on the convolutions with that gradient (the rest fixed), 40 steps on a fixed
    batch: the loss falls below half its first value (last / first 0.11, 0.14, 0.08 at model
    seeds 0, 1, 2). The loop's part (adding and logging it) is the next test's."""
    import optax

    model = build_model(conv_config(), num_classes=VOCAB, vocab_size=VOCAB, max_len=T,
                        head="tokens", causal=True, seed=0)
    tokens, mask = (a[:, :2 * S] for a in _inputs())     # the second segment evicts the first
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def losses(p):
        m = nnx.merge(graphdef, p, rest)
        out = m.encoder.states(jnp.asarray(tokens), jnp.asarray(mask), train=True)[0]
        return pop_aux_losses(m)["recon_loss"][0], jnp.sum(jnp.sin(out))

    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, opt_state):                # one forward, the two pullbacks batched, Adam
        (recon, _), pull = jax.vjp(losses, p)
        g = jax.vmap(pull)((jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])))[0]
        g_recon, g_task = (jax.tree.map(lambda a: a[i], g) for i in (0, 1))
        updates, opt_state = opt.update(g_recon, opt_state)   # zero outside the convolutions
        return recon, g_recon, g_task, optax.apply_updates(p, updates), opt_state

    compressor = lambda path: "compressor" in path  # noqa: E731
    recon, g_recon, g_task, params, opt_state = step(params, opt.init(params))
    seen = set()
    for path, v in nnx.to_flat_state(g_recon):
        size = float(np.abs(np.asarray(v[...])).max())
        if compressor(path):
            seen.add(path[2])
            assert size > 0, path
        else:
            assert size == 0, path
    assert seen == {0, 1}
    for path, v in nnx.to_flat_state(g_task):
        if compressor(path):
            np.testing.assert_array_equal(np.asarray(v[...]), 0.0)
    recon = [float(recon)]
    for _ in range(39):
        value, _, _, params, opt_state = step(params, opt_state)
        recon.append(float(value))
    assert np.isfinite(recon).all() and recon[0] > 0
    assert recon[-1] < 0.5 * recon[0], recon


def test_the_loop_adds_and_logs_auxiliary_losses():
    """make_train_step adds weight x value of an AuxLoss the model leaves to the objective's
    loss (a toy model: the objective does not depend on p, the aux loss (p - 3)^2 with weight 2
    does) and reports the value under its name; TrainMonitor logs it."""
    import optax

    from models.recurrent import AuxLoss
    from training.loop import make_train_step
    from training.metrics import TrainMonitor

    class Toy(nnx.Module):
        def __init__(self):
            self.p = nnx.Param(jnp.zeros(()))

        def __call__(self, x):
            self.aux_demo = AuxLoss(jnp.square(self.p[...] - 3.0), weight=2.0)
            return x

    def objective(model, batch, *, train, rngs=None):
        x = model(batch["x"])
        return {"loss_sum": x, "correct": 0 * x, "count": jnp.ones_like(x)}

    model = Toy()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)))
    step = jax.jit(make_train_step(graphdef, 0, objective))
    state, metrics = step(state, {"x": jnp.ones((2,))}, jnp.asarray(0, jnp.int32))
    assert float(metrics["loss"]) == 1.0                      # the objective's loss alone
    assert float(metrics["aux"]["aux_demo"]) == 9.0
    np.testing.assert_allclose(float(metrics["grad_norm"]), 2 * 2 * 3.0)   # d/dp 2 (p - 3)^2
    np.testing.assert_allclose(float(state[0]["p"][...]), 0.1 * 12.0, rtol=1e-6)

    class Writer:
        rows = []
        write = rows.append
        advance = staticmethod(lambda n: None)

    monitor = TrainMonitor(Writer, lambda s: 0.0, 2, lambda: None)
    monitor.add(metrics)
    monitor.check(1)
    assert Writer.rows[0]["aux_demo"] == 9.0 and Writer.rows[0]["loss"] == 1.0


def test_compressive_config_errors():
    c = lm_config.get_config("dense,tiny")
    c.model.update(recurrence="compressive", segment_len=16, mem_len=16, cmem_len=8,
                   compression_rate=3)
    with pytest.raises(ConfigError, match="must divide"):
        validate_config(c)
    c.model.update(compression_rate=4, compression="pool")
    with pytest.raises(ConfigError, match="model.compression"):
        validate_config(c)
    c.model.update(compression="conv", recon_weight=-1.0)
    with pytest.raises(ConfigError, match="model.recon_weight"):
        validate_config(c)


def _random_bits_keys(jaxpr):
    """The key dtypes random_bits draws from, in jaxpr and every jaxpr nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "random_bits":
            found.append(str(eqn.invars[0].aval.dtype))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _random_bits_keys(inner)
    return found


def test_xl_dropout_masks_are_philox_like_the_encoders():
    """XL's dropout draws its masks from models/dropout_prng's elementwise Philox (as the
    encoder does; threefry's per-call buffers grew memory under remat): threefry only draws
    the one Philox key per forward pass."""
    from models.dropout_prng import IMPL
    c = xl_config(dropout_rate=0.1, attention_dropout_rate=0.1, num_layers=1)
    graphdef, state = nnx.split(build(c))
    tokens, mask = _inputs()

    def forward(state):
        return nnx.merge(graphdef, state)(tokens, mask, train=True, rngs=nnx.Rngs(dropout=0))
    keys = _random_bits_keys(jax.make_jaxpr(forward)(state).jaxpr)
    philox = [k for k in keys if k == f"key<{IMPL}>"]
    assert len(philox) >= 3 and len(keys) - len(philox) == 1, keys
