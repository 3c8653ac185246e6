"""Pictures of attention: the mask of every fixed-pattern variant, and a trained head's map.

    python -m tools.masks --out results/masks [--length 64] [--causal] [--set window=4]
    python -m tools.masks --workdir runs/sweep/listops/local --layer 0 --head 0 --example 0 \\
        --out results/masks

Masks: each registered variant whose name is a predicate of attention/patterns.py (the exact
keep(i, j) the variant and its kernels share) is drawn with `patterns.dense_mask` as an
n x n grid, one cell per (query, key) pair, like the figures of the Sparse Transformer paper
(Child et al., 2019, Fig. 3). Hyperparameters: the variant's defaults, shrunk so the structure
shows at the picture's length (PICTURE_HPARAMS, by hyperparameter name), then --set overrides.
A variant with an `axis` hyperparameter (axial) is drawn for both axes (the model alternates
them by layer). Writes OUT/<variant>.png and OUT/patterns.png (all in one figure).

Attention map: the checkpoint's model is run on one example of the run's task; the chosen
layer's q and k projections are captured and the map softmax(q k^T / sqrt(d)) of the chosen
head is formed over the real keys, restricted to the variant's pattern where it has one. For
dense and fixed-pattern variants this is exactly the attention the layer computed (checked:
weights @ v reproduces the layer's output, error written in the figure); for approximating
variants (kernels, low rank, hashing, ...) it is the softmax their layer approximates.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import textwrap

import numpy as np

# Hyperparameter name -> value used in pictures (length 64), where the variant has it.
PICTURE_HPARAMS = {"window": 3, "stride": 8, "block_size": 4, "summary": 1, "num_global": 2,
                   "num_window_blocks": 3, "num_global_blocks": 2, "num_random_blocks": 1}
PICTURE_LENGTH = 64


def pattern_of(name: str):
    """The patterns.py predicate for variant `name`, or None if it has no fixed pattern."""
    from attention import patterns

    fn = getattr(patterns, name, None)
    if not callable(fn) or name.startswith("_") or name == "dense_mask":
        return None
    params = list(inspect.signature(fn).parameters)
    return fn if params[:2] == ["i", "j"] else None


def pattern_variants() -> list[str]:
    """Registered variants that have a fixed pattern (what exists now, in registry order)."""
    import attention

    return [n for n in attention.names() if pattern_of(n) is not None]


def predicate_kwargs(name: str, length: int, hparams: dict, buffers: dict | None = None,
                     head: int = 0) -> dict:
    """The keyword arguments of the variant's predicate at `length`, from its hyperparameters,
    its init_state buffers (bigbird's random layout, per head) and derived sizes."""
    fn = pattern_of(name)
    kwargs = {}
    for p in list(inspect.signature(fn).parameters.values())[2:]:
        if p.name in hparams:
            kwargs[p.name] = hparams[p.name]
        elif p.name == "num_blocks":
            kwargs[p.name] = -(-length // int(hparams["block_size"]))
        elif buffers is not None and p.name in buffers:
            b = np.asarray(buffers[p.name])
            kwargs[p.name] = b[head] if b.ndim == 3 else b  # per-head layouts: [H, nb, r]
        elif p.default is not inspect.Parameter.empty:
            continue
        else:
            raise ValueError(f"masks: variant {name!r}: cannot supply predicate argument "
                             f"{p.name!r} (hyperparameters: {sorted(hparams)})")
    if "shape" in kwargs:
        kwargs["shape"] = tuple(int(s) for s in kwargs["shape"])
    return kwargs


def picture_hparams(name: str, length: int, overrides: dict | None = None) -> dict:
    import attention

    hp = attention.hparams_for(name)
    for k, v in PICTURE_HPARAMS.items():
        if k in hp:
            hp[k] = v
    if "shape" in hp:
        from tools.bench_attention import near_square
        hp["shape"] = near_square(length)
    if "num_prefix" in hp:
        hp["num_prefix"] = 0
    for k, v in (overrides or {}).items():
        if k in hp:
            hp[k] = v
    return attention.hparams_for(name, hp)


def picture_setup(name: str, length: int = PICTURE_LENGTH, overrides: dict | None = None,
                  seed: int = 0) -> tuple[list[dict], dict]:
    """([hparams per panel], init_state of one head) of the variant's picture; one panel per
    axis for variants with an `axis` hyperparameter."""
    import jax

    import attention

    hp = picture_hparams(name, length, overrides)
    state = attention.get(name).init_state(jax.random.key(seed), q_len=length, kv_len=length,
                                           num_heads=1, head_dim=8, **hp)
    panels = [{**hp, "axis": axis} for axis in (0, 1)] if "axis" in hp else [hp]
    return panels, state


def variant_masks(name: str, length: int = PICTURE_LENGTH, causal: bool = False,
                  overrides: dict | None = None, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """[(label, bool [length, length])]: the variant's pattern (one per axis for axial)."""
    from attention import patterns

    panels, state = picture_setup(name, length, overrides, seed)
    out = []
    for h in panels:
        kw = predicate_kwargs(name, length, h, state["buffers"])
        label = ", ".join(f"{k}={v}" for k, v in sorted(kw.items()) if k != "random_layout")
        if "random_layout" in kw:
            label += ", random blocks drawn"
        out.append((label, patterns.dense_mask(pattern_of(name), length, length,
                                               causal=causal, **kw)))
    return out


def _draw_mask(ax, mask: np.ndarray, title: str):
    import matplotlib.colors as mcolors

    n = mask.shape[0]
    cmap = mcolors.ListedColormap(["#ffffff", "#1f4e9c"])
    ax.imshow(mask, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    if n <= 96:  # cell borders: one square per (query, key) pair
        ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
        ax.grid(which="minor", color="#d0d0d0", linewidth=0.3)
        ax.tick_params(which="minor", length=0)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    density = mask.mean()
    title = "\n".join(textwrap.wrap(title, 48))
    ax.set_title(f"{title}\n{density:.1%} of pairs", fontsize=8)


def draw_masks(out: str, length: int = PICTURE_LENGTH, causal: bool = False,
               overrides: dict | None = None, variants=None) -> list[str]:
    """One PNG per fixed-pattern variant and patterns.png with all. -> written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    variants = variants or pattern_variants()
    panels, paths = [], []
    for name in variants:
        masks = variant_masks(name, length, causal, overrides)
        fig, axes = plt.subplots(1, len(masks), figsize=(5.2 * len(masks), 5.4), squeeze=False)
        for ax, (label, m) in zip(axes[0], masks):
            _draw_mask(ax, m, f"{name}{' (causal)' if causal else ''}: {label}")
            panels.append((name, label, m))
        fig.tight_layout()
        path = os.path.join(out, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if panels:
        cols = min(4, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.6 * rows), squeeze=False)
        for ax, (name, label, m) in zip(axes.flat, panels):
            _draw_mask(ax, m, f"{name}: {label}")
            ax.xaxis.label.set_visible(False)
            ax.yaxis.label.set_visible(False)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"Fixed attention patterns at n = {length} (blue: query i attends to key j)")
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        path = os.path.join(out, "patterns.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ trained attention maps
@contextlib.contextmanager
def _capture_projections(attn):
    """Records the outputs of attn.query / attn.key / attn.value and the input of attn.out."""
    from flax import nnx

    captured = {}
    original = nnx.Linear.__call__
    roles = {id(attn.query): "q", id(attn.key): "k", id(attn.value): "v"}

    def call(self, x, *args, **kwargs):
        y = original(self, x, *args, **kwargs)
        if id(self) in roles:
            captured.setdefault(roles[id(self)], y)
        elif self is attn.out:
            captured.setdefault("y", x)
        return y

    nnx.Linear.__call__ = call
    try:
        yield captured
    finally:
        nnx.Linear.__call__ = original


def _captured_forward(model, inputs, mask, layer: int) -> dict:
    """q, k, v projections and the attention output (pre out-projection) of `layer`, from one
    jitted forward pass (one compile instead of op-by-op dispatch)."""
    from flax import nnx

    @nnx.jit
    def run(model, inputs, mask):
        attn = encoder_of(model).blocks[layer].attention
        with _capture_projections(attn) as cap:
            model(inputs, mask, train=False)
        return dict(cap)

    return run(model, inputs, mask)


def encoder_of(model):
    return model.encoder


def attention_map(model, inputs: np.ndarray, mask: np.ndarray, *, layer: int = 0,
                  head: int = 0) -> dict:
    """The softmax attention of `head` in `layer` on one example.

    inputs, mask: one example as the task gives it ([T] or [2, T] for pair tasks; the first
    sequence is used). -> {"weights": [T', T'] float (T' counts a CLS prefix), "kv_mask",
    "pattern" (bool or None), "exact_error": max |weights @ v - layer output| / max |output|}.
    """
    import jax
    import jax.numpy as jnp

    from attention import patterns
    from attention._util import masked_softmax

    inputs, mask = np.asarray(inputs), np.asarray(mask, bool)
    if inputs.ndim == 2:  # pair task: look at the first document
        inputs, mask = inputs[0], mask[0]
    enc = encoder_of(model)
    if not 0 <= layer < len(enc.blocks):
        raise ValueError(f"masks: layer must be in [0, {len(enc.blocks)}); got {layer}")
    attn = enc.blocks[layer].attention
    if not 0 <= head < attn.num_heads:
        raise ValueError(f"masks: head must be in [0, {attn.num_heads}); got {head}")
    batch_in = jnp.asarray(inputs)[None]
    batch_mask = jnp.asarray(mask)[None]
    pair = getattr(model, "interaction", None) is not None
    if pair:
        batch_in = jnp.stack([batch_in, batch_in], axis=1)
        batch_mask = jnp.stack([batch_mask, batch_mask], axis=1)
    cap = _captured_forward(model, batch_in, batch_mask, layer)
    d = attn.head_dim
    t = cap["q"].shape[1]
    split = lambda a: np.asarray(a[:1], np.float32).reshape(1, t, attn.num_heads, d)  # noqa
    q, k, v = split(cap["q"]), split(cap["k"]), split(cap["v"])  # [1, T', H, D]
    prefix = t - mask.shape[0]
    kv = np.concatenate([np.ones(prefix, bool), mask])  # [T']
    name = attn.attention_name
    pattern = None
    if pattern_of(name) is not None:
        buffers = {n: np.asarray(getattr(attn, f"buffer_{n}")[...]) for n in attn.buffer_names}
        kw = predicate_kwargs(name, t, attn.hparams, buffers, head=head)
        pattern = patterns.dense_mask(pattern_of(name), t, t, **kw)
    allowed = kv[None, :] if pattern is None else (pattern & kv[None, :])
    logits = q[0, :, head] @ k[0, :, head].T / math.sqrt(d)  # [T', T']
    weights = np.asarray(masked_softmax(jnp.asarray(logits), jnp.asarray(allowed)))
    out = weights @ v[0, :, head]  # [T', D]
    y = np.asarray(cap["y"][:1], np.float32).reshape(1, t, attn.num_heads, -1)[0, :, head]
    real = kv
    err = float(np.max(np.abs(out[real] - y[real])) / max(np.max(np.abs(y[real])), 1e-12))
    del jax
    return {"weights": weights, "kv_mask": kv, "pattern": pattern, "exact_error": err,
            "variant": name, "layer": layer, "head": head, "prefix": prefix}


def load_trained(workdir: str):
    """(config, task, model) of the latest checkpoint in a train.py workdir."""
    import ml_collections
    from flax import nnx

    from training.loop import load_checkpoint, setup

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    s = setup(config)
    step = load_checkpoint(workdir, s)
    model, _ = nnx.merge(s.graphdef, s.state)
    return config, s.task, model, step


def draw_attention_map(result: dict, path: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = result["weights"]
    real = np.flatnonzero(result["kv_mask"])
    w = w[np.ix_(real, real)]
    fig, axes = plt.subplots(1, 2 if result["pattern"] is not None else 1,
                             figsize=(11 if result["pattern"] is not None else 6, 5.4),
                             squeeze=False)
    im = axes[0, 0].imshow(w, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=axes[0, 0], fraction=0.046)
    exact = result["exact_error"] < 1e-3
    axes[0, 0].set_title(
        f"{result['variant']} layer {result['layer']} head {result['head']}"
        + (" (position 0 = CLS)" if result["prefix"] else "") + "\n"
        + (f"exact: weights @ v reproduces the layer output (rel. err {result['exact_error']:.1e})"
           if exact else f"softmax(q k^T) of the layer's projections; the variant computes an "
                         f"approximation (rel. err {result['exact_error']:.2f})"), fontsize=8)
    axes[0, 0].set_xlabel("key position")
    axes[0, 0].set_ylabel("query position")
    if result["pattern"] is not None:
        _draw_mask(axes[0, 1], result["pattern"][np.ix_(real, real)], "the variant's pattern")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parse_sets(items):
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE, e.g. window=4")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/masks")
    p.add_argument("--length", type=int, default=PICTURE_LENGTH)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="HPARAM=VALUE")
    p.add_argument("--variants", default="all", help="fixed-pattern variants or 'all'")
    p.add_argument("--workdir", default=None, help="a train.py workdir: draw its attention map")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--head", type=int, default=0)
    p.add_argument("--example", type=int, default=0)
    p.add_argument("--split", default="test")
    a = p.parse_args(argv)
    if a.workdir:
        config, task, model, step = load_trained(a.workdir)
        ex = task.splits[a.split][a.example]
        result = attention_map(model, ex["inputs"], ex["mask"], layer=a.layer, head=a.head)
        name = f"attention_{task.name}_{result['variant']}_l{a.layer}h{a.head}.png"
        path = draw_attention_map(result, os.path.join(a.out, name),
                                  f"{a.workdir} step {step}, {a.split} example {a.example} "
                                  f"(label {int(ex['label'])})")
        print(f"-> {path}")
        return
    from tools.sweep import parse_list
    variants = parse_list(a.variants, pattern_variants(), "variants")
    for path in draw_masks(a.out, a.length, a.causal, _parse_sets(a.set), variants):
        print(f"-> {path}")


if __name__ == "__main__":
    main()
