"""Document retrieval (LRA "Retrieval"): do two ACL Anthology Network papers cite each other?
(Radev et al., 2013; the AAN pairs of the LRA release.)

Data: the LRA release files new_aan_pairs.{train,eval,test}.tsv (147,086 / 18,090 / 17,437
pairs): tab-separated, no header, columns label, id1, id2, text1, text2 (label 0 or 1, written
as an integer or a float such as 1.0; no quoting: a quote is a character of the text). Each
document is tokenized as UTF-8 bytes (ids 0-255) and truncated to data.max_len (LRA: 4000).
An example is a pair: inputs and mask are [2, max_len] (Task.pair = True); the model encodes
both with one shared encoder and classifies [u, v, u*v, u-v].

The parsed tokens are cached as .npy files under data.cache_dir (keyed by the file's path,
size, mtime and max_len), so the 1.5 GB of text is read once.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from lra.base import Task, TokenSource, register_task

SPLIT_FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
               "test": "new_aan_pairs.test.tsv"}
NUM_CLASSES = 2
VOCAB_SIZE = 256
DEFAULT_DIR = os.path.join("data", "lra_release")
# Where the TSVs may sit below data.data_dir (the release tarball lra_release.gz unpacks to
# lra_release/ with the AAN files in tsv_data/).
SUBDIRS = ("", "tsv_data", os.path.join("lra_release", "tsv_data"))


def find_files(data_dir: str) -> dict[str, str]:
    """-> {split: path}; FileNotFoundError naming what to download and where to put it."""
    for sub in SUBDIRS:
        base = os.path.join(data_dir, sub)
        paths = {s: os.path.join(base, f) for s, f in SPLIT_FILES.items()}
        if all(os.path.isfile(p) for p in paths.values()):
            return paths
    searched = ", ".join(repr(os.path.join(data_dir, s) or ".") for s in SUBDIRS)
    raise FileNotFoundError(
        f"retrieval: the AAN pair files {', '.join(SPLIT_FILES.values())} were not found in "
        f"data.data_dir={data_dir!r} (searched {searched}). Download the LRA release "
        f"(https://storage.googleapis.com/long-range-arena/lra_release.gz), unpack it and point "
        f"data.data_dir at the folder that holds them, e.g. DIR/new_aan_pairs.train.tsv or "
        f"DIR/tsv_data/new_aan_pairs.train.tsv (lines: label<TAB>id1<TAB>id2<TAB>text1<TAB>"
        f"text2, no header).")


def parse_label(field: str) -> int:
    value = float(field)          # ValueError for non-numbers
    if value not in (0.0, 1.0):
        raise ValueError(f"label {field!r} is not 0 or 1")
    return int(value)


def read_tsv(path: str, max_len: int):
    """-> tokens uint8 [N, 2, max_len], lengths int32 [N, 2], labels int32 [N].
    A malformed line is a ValueError naming the file and the line number."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            cols = line.split(b"\t")
            if len(cols) != 5:
                raise ValueError(
                    f"{path}:{lineno}: expected 5 tab-separated columns (label, id1, id2, "
                    f"text1, text2); got {len(cols)}")
            try:
                label = parse_label(cols[0].decode("ascii", "replace").strip())
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad label: {e}") from None
            rows.append((label, cols[3][:max_len], cols[4][:max_len]))
    n = len(rows)
    tokens = np.zeros((n, 2, max_len), np.uint8)
    lengths = np.zeros((n, 2), np.int32)
    labels = np.zeros((n,), np.int32)
    for i, (label, t1, t2) in enumerate(rows):
        labels[i] = label
        for j, t in enumerate((t1, t2)):
            tokens[i, j, :len(t)] = np.frombuffer(t, np.uint8)
            lengths[i, j] = len(t)
    return tokens, lengths, labels


def load_split(path: str, max_len: int, cache_dir: str | None) -> TokenSource:
    """Reads a TSV through a cache of .npy files (memory-mapped) under cache_dir."""
    if not cache_dir:
        return TokenSource(*read_tsv(path, max_len))
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{max_len}"
                       .encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, "retrieval", f"{os.path.basename(path)}.{key}")
    names = ("tokens", "lengths", "labels")
    if not os.path.exists(os.path.join(cache, "DONE")):
        arrays = read_tsv(path, max_len)
        try:
            os.makedirs(cache, exist_ok=True)
            for name, arr in zip(names, arrays):
                np.save(os.path.join(cache, f"{name}.npy"), arr)
            with open(os.path.join(cache, "DONE"), "w") as f:
                json.dump({"source": os.path.abspath(path), "max_len": max_len}, f)
        except OSError:
            return TokenSource(*arrays)      # unwritable cache dir: keep it in memory
        return TokenSource(*arrays)
    tokens = np.load(os.path.join(cache, "tokens.npy"), mmap_mode="r")
    return TokenSource(tokens, np.load(os.path.join(cache, "lengths.npy")),
                      np.load(os.path.join(cache, "labels.npy")))


@register_task("retrieval")
def build(cfg) -> Task:
    if cfg.max_len < 1:
        raise ValueError(f"retrieval: data.max_len must be >= 1; got {cfg.max_len!r}")
    data_dir = cfg.get("data_dir", "") or DEFAULT_DIR
    paths = find_files(data_dir)
    splits = {s: load_split(p, cfg.max_len, cfg.get("cache_dir", "")) for s, p in paths.items()}
    return Task(name="retrieval", splits=splits, num_classes=NUM_CLASSES, vocab_size=VOCAB_SIZE,
                max_len=cfg.max_len, pair=True,
                info={"origin": f"AAN pairs in {os.path.dirname(paths['train'])}",
                      **{f"num_{k}": len(v) for k, v in splits.items()}})
