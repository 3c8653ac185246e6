"""ListOps (Nangia & Bowman, 2018) as used by Long Range Arena: generator, release format, reader.

Generator (faithful to LRA's): a tree is drawn recursively from depth 1; below max_depth a node
is a leaf (a digit 0-9) when r ~ U(0, 1) > 0.25, else an operator (MIN, MAX, MED = int of the
median, SM = sum mod 10) over randint(2, max_args) children; at max_depth it is a leaf. Length
counts leaves plus 2 per operator (its token and the closing `]`). Trees with
min_length < length < max_length are kept, duplicates dropped. The random stream comes in
chunks of CHUNK kept trees, chunk k drawn from Random((seed, k)) and taken in order, so chunks
run in parallel processes and the data depends on the seed only.

Release format: TSV with a `Source\\tTarget` header, every operator application written as a
left-nested chain of binary pairs in parentheses, e.g. MAX(2, MIN(9, 4)) is
`( ( ( [MAX 2 ) ( ( ( [MIN 9 ) 4 ) ] ) ) ] )`. Readers drop `(` and `)`, leaving prefix tokens.

    python -m lra.listops --out_dir DIR --num_train N --num_val N --num_test N --seed S
        [--processes P]   (every core by default; the files depend on the seed, not on P)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Iterable

import numpy as np

from lra._data import add_processes, at_least, progress, spawn_without_main
from lra.base import Task, TokenSource, register_task

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
# Token ids: 0 is padding (never produced by a real token; the mask marks padding anyway).
VOCAB = ("<pad>",) + DIGITS + OPERATORS + (END,)
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
PAD_ID = 0
NUM_CLASSES = 10
SPLIT_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}
LEAF_PROB = 0.25  # r > LEAF_PROB -> leaf


# ----------------------------------------------------------------------------- generator
def generate_tree(rng: random.Random, depth: int = 1, max_depth: int = 10, max_args: int = 10):
    """-> (tree, length). A tree is a digit (int) or (operator, [children])."""
    return _tree_within(rng, depth, max_depth, max_args, math.inf)


def evaluate(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [evaluate(c) for c in children]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(statistics.median(values))
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def to_release_string(tree) -> str:
    """The LRA release bracketing: ( ( ( [OP a ) b ) ] ) for OP(a, b)."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    s = f"( {op} {to_release_string(children[0])} )"
    for child in children[1:]:
        s = f"( {s} {to_release_string(child)} )"
    return f"( {s} {END} )"


CHUNK = 64   # candidates per unit of work; the data depends on (seed, CHUNK), not on processes
GENERATOR_VERSION = 2   # in the cache folder's name: data made by an earlier generator differs


class _TooLong(Exception):
    pass


def _tree_within(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: int):
    """A random tree (LRA's generator) that gives up (_TooLong) as soon as it reaches `budget`
    tokens: such a tree would be rejected anyway, so the kept trees have the same distribution."""
    r = rng.random() if depth < max_depth else 1.0
    if r > LEAF_PROB:
        return rng.randrange(10), 1
    num_args = rng.randint(2, max_args)
    children, length = [], 2
    for _ in range(num_args):
        child, child_len = _tree_within(rng, depth + 1, max_depth, max_args, budget - length)
        children.append(child)
        length += child_len
        if length >= budget:
            raise _TooLong
    return (OPERATORS[rng.randrange(len(OPERATORS))], children), length


def generate_chunk(seed: int, k: int, *, min_length: int = 500, max_length: int = 2000,
                   max_depth: int = 10, max_args: int = 10) -> list[tuple[str, int]]:
    """Chunk k of the candidate stream: the first CHUNK trees of Random((seed, k)) with
    min_length < length < max_length, as (release string, label) pairs. A tree is abandoned
    once it reaches max_length (rejection sampling either way: same distribution, and 8x
    faster for short expressions, whose random trees are mostly far too long)."""
    rng = random.Random(f"listops:{seed}:{k}")
    out = []
    while len(out) < CHUNK:
        try:
            tree, length = _tree_within(rng, 1, max_depth, max_args, max_length)
        except _TooLong:
            continue
        if min_length < length:
            out.append((to_release_string(tree), evaluate(tree)))
    return out


def _chunk_job(args):
    seed, k, kw = args
    return generate_chunk(seed, k, **kw)


def generate(num: int, seed: int, *, min_length: int = 500, max_length: int = 2000,
             max_depth: int = 10, max_args: int = 10, exclude: Iterable[str] = (),
             processes: int = 1, parallel_after_s: float = 10.0,
             desc: str | None = None) -> list[tuple[str, int]]:
    """`num` distinct (release string, label) pairs with min_length < length < max_length.

    Candidates come in chunks (generate_chunk, seeded by (seed, chunk number)) taken in chunk
    order, duplicates dropped, so the result depends on the seed only: not on `processes`, nor
    on when the work moved to them. Chunks run in this process until the first ones project
    more than `parallel_after_s` seconds of work; then in `processes` worker processes
    (spawned). `desc`: show a progress bar (count, rate, ETA) with this label."""
    if min_length + 1 >= max_length:
        raise ValueError(f"listops: need min_length + 1 < max_length; got {min_length}, {max_length}")
    if num < 0 or processes < 1:
        raise ValueError(f"listops: need num >= 0 and processes >= 1; got {num}, {processes}")
    kw = dict(min_length=min_length, max_length=max_length, max_depth=max_depth,
              max_args=max_args)
    seen = set(exclude)
    out: list[tuple[str, int]] = []
    bar = progress(num, desc) if desc else None
    pool, k = None, 0
    t0 = time.perf_counter()
    try:
        while len(out) < num:
            # a wave of chunks (at least enough for what is missing, were there no duplicates)
            wave = max(-(-(num - len(out)) // CHUNK), 1)
            if pool is None and processes > 1 and out:
                per_example = (time.perf_counter() - t0) / len(out)
                if per_example * (num - len(out)) > parallel_after_s:
                    import multiprocessing
                    with spawn_without_main():
                        pool = multiprocessing.get_context("spawn").Pool(processes)
            if pool is None:
                wave = 1 if processes > 1 else wave   # measure before deciding on workers
                results = (generate_chunk(seed, j, **kw) for j in range(k, k + wave))
            else:
                wave = max(wave, processes)
                results = pool.imap(_chunk_job, [(seed, j, kw) for j in range(k, k + wave)])
            for rows in results:
                before = len(out)
                for s, label in rows:
                    if len(out) == num:
                        break
                    if s not in seen:
                        seen.add(s)
                        out.append((s, label))
                if bar is not None:
                    bar.update(len(out) - before)
                if len(out) == num:
                    break
            k += wave
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return out


def write_tsv(path: str, rows: list[tuple[str, int]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("Source\tTarget\n")
        for source, target in rows:
            f.write(f"{source}\t{target}\n")
    os.replace(tmp, path)


def generate_files(out_dir: str, *, num_train: int, num_val: int, num_test: int, seed: int,
                   min_length: int = 500, max_length: int = 2000, processes: int = 1,
                   progress_bar: bool = False) -> dict[str, str]:
    """Writes basic_{train,val,test}.tsv in the release format; no duplicates across splits.
    The files depend on the seed and sizes only, not on `processes`."""
    os.makedirs(out_dir, exist_ok=True)
    rows = generate(num_train + num_val + num_test, seed, min_length=min_length,
                    max_length=max_length, processes=processes,
                    desc="listops: generating" if progress_bar else None)
    parts = {"train": rows[:num_train], "validation": rows[num_train:num_train + num_val],
             "test": rows[num_train + num_val:]}
    paths = {}
    for split, part in parts.items():
        paths[split] = os.path.join(out_dir, SPLIT_FILES[split])
        write_tsv(paths[split], part)
    return paths


# ----------------------------------------------------------------------------- reader
def tokenize(source: str) -> list[int]:
    """Release string -> token ids (parentheses dropped). ValueError on an unknown token."""
    ids = []
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        if tok not in TOKEN_ID or tok == "<pad>":
            raise ValueError(f"unknown ListOps token {tok!r}; valid: {', '.join(VOCAB[1:])}")
        ids.append(TOKEN_ID[tok])
    return ids


def read_tsv(path: str) -> tuple[list[list[int]], np.ndarray]:
    """-> (token id lists, labels). Errors name the file and the line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"ListOps file not found: {path}")
    seqs, labels = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte "
                                 f"0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if lineno == 1:
                if line.split("\t") != ["Source", "Target"]:
                    raise ValueError(f"{path}:1: expected header 'Source\\tTarget', got "
                                     f"{line.split(chr(9))!r}")
                continue
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != 2:
                raise ValueError(f"{path}:{lineno}: expected 2 tab-separated columns, got {len(cols)}")
            try:
                label = int(cols[1])
                if not 0 <= label < NUM_CLASSES:
                    raise ValueError(f"label {label} outside 0-9")
                seqs.append(tokenize(cols[0]))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            labels.append(label)
    if not seqs:
        raise ValueError(f"{path}: no examples (the file is empty or holds only its header)")
    return seqs, np.asarray(labels, np.int32)


def pack(seqs: list[list[int]], labels: np.ndarray, max_len: int, path: str = "") -> TokenSource:
    """Pads to max_len. A sequence longer than max_len is an error (LRA keeps < 2000)."""
    tokens = np.full((len(seqs), max_len), PAD_ID, np.uint8)
    lengths = np.zeros(len(seqs), np.int32)
    for n, seq in enumerate(seqs):
        if len(seq) > max_len:
            raise ValueError(
                f"ListOps {path}: example {n} has {len(seq)} tokens > max_len {max_len}; "
                f"raise data.max_len")
        tokens[n, :len(seq)] = seq
        lengths[n] = len(seq)
    return TokenSource(tokens, lengths, labels)


def _load_split(path: str, max_len: int) -> TokenSource:
    """Reads a TSV, with a tokenized .npz cache beside it (keyed by the file's size/mtime)."""
    st = os.stat(path)
    key = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}:{max_len}".encode()).hexdigest()[:12]
    cache = f"{path}.{key}.npz"
    if os.path.exists(cache):
        z = np.load(cache, allow_pickle=False)
        return TokenSource(z["tokens"], z["lengths"], z["labels"])
    seqs, labels = read_tsv(path)
    src = pack(seqs, labels, max_len, path)
    try:
        tmp = cache + ".tmp.npz"
        np.savez(tmp, tokens=src.tokens, lengths=src.lengths, labels=src.label)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only data dir: no cache
    return src


def generated_dir(cfg) -> str:
    spec = dict(seed=cfg.get("gen_seed", 0), num_train=cfg.num_train, num_val=cfg.num_val,
                num_test=cfg.num_test, min_length=cfg.min_length, max_length=cfg.max_length,
                generator=GENERATOR_VERSION)
    tag = "_".join(f"{k}{v}" for k, v in spec.items())
    return os.path.join(cfg.cache_dir, "listops", tag)


@register_task("listops")
def build(cfg) -> Task:
    """data_dir set: read the release files there; else generate into the cache on first use."""
    if cfg.data_dir:
        data_dir = cfg.data_dir
        missing = [f for f in SPLIT_FILES.values() if not os.path.exists(os.path.join(data_dir, f))]
        if missing:
            raise FileNotFoundError(
                f"listops: {', '.join(missing)} not found in data.data_dir={data_dir!r}. Expected "
                f"the LRA release's listops-1000/ folder (basic_train.tsv, basic_val.tsv, "
                f"basic_test.tsv from lra_release.gz), or leave data.data_dir empty to generate.")
        origin = f"release files in {data_dir}"
    else:
        data_dir = generated_dir(cfg)
        done = os.path.join(data_dir, "DONE")
        if not os.path.exists(done):
            print(f"listops: generating {cfg.num_train}/{cfg.num_val}/{cfg.num_test} examples "
                  f"into {data_dir} (once; reused afterwards; {os.cpu_count()} processes once "
                  f"it takes long)", file=sys.stderr)
            generate_files(data_dir, num_train=cfg.num_train, num_val=cfg.num_val,
                           num_test=cfg.num_test, seed=cfg.get("gen_seed", 0),
                           min_length=cfg.min_length, max_length=cfg.max_length,
                           processes=os.cpu_count() or 1, progress_bar=True)
            with open(done, "w") as f:
                json.dump({"generator": "lra.listops", "seed": cfg.get("gen_seed", 0)}, f)
        origin = f"generated in {data_dir}"
    splits = {split: _load_split(os.path.join(data_dir, name), cfg.max_len)
              for split, name in SPLIT_FILES.items()}
    return Task(name="listops", splits=splits, num_classes=NUM_CLASSES, vocab_size=len(VOCAB),
                max_len=cfg.max_len, info={"origin": origin,
                                           **{f"num_{k}": len(v) for k, v in splits.items()}})


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate ListOps in the LRA release format.")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--num_train", type=at_least(0), default=96000)
    p.add_argument("--num_val", type=at_least(0), default=2000)
    p.add_argument("--num_test", type=at_least(0), default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min_length", type=int, default=500)
    p.add_argument("--max_length", type=int, default=2000)
    add_processes(p, "once generation takes more than a few seconds")
    a = p.parse_args(argv)
    if a.min_length + 1 >= a.max_length:
        p.error(f"need --min_length + 1 < --max_length; got {a.min_length}, {a.max_length}")
    paths = generate_files(a.out_dir, num_train=a.num_train, num_val=a.num_val,
                           num_test=a.num_test, seed=a.seed, min_length=a.min_length,
                           max_length=a.max_length, processes=a.processes, progress_bar=True)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
