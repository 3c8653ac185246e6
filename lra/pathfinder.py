"""Pathfinder and Path-X (LRA): are the two circles joined by one dashed contour?
(Linsley et al., 2018; Kim, Linsley et al., 2020; LRA uses the hard setting: contour length 14.)

An image of R x R pixels is R^2 tokens (values 0-255, vocab 256), row-major; every pixel is a
real token (the mask is all True). Pathfinder is R = 32 (1,024 tokens), Path-X R = 128 (16,384);
64 and 256 are available too. Difficulty easy / intermediate / hard = contour length 6 / 9 / 14
paddles. Task.grid_shape = (R, R).

Data comes from one of two places:
- generated on the fly (data.data_dir empty): the faithful generator of lra/_pathfinder_gen.py,
  deterministic per (data.gen_seed, index) with random access, so no dump is needed and a
  resumed run sees the same examples. Splits are disjoint index ranges of one stream (train
  from 0, validation from 10^9, test from 2 * 10^9) of data.num_train / num_val / num_test
  examples. Generated images are kept in memory once made (data.memoize).
- the LRA release (data.data_dir set): DIR/pathfinder{R}/{curv_baseline | curv_contour_length_9 |
  curv_contour_length_14}/imgs/<batch>/sample_<i>.png with metadata/<batch>.npy, whitespace
  text rows `imgs/<batch> sample_<i>.png <i> <label> ...` (a binary .npy of strings is read
  too). Images are decoded once into a cache under data.cache_dir; empty or unreadable PNGs
  (the release has some) are skipped and counted in Task.info. Split 80/10/10 in the order of
  the metadata (batches by number, rows in file order).

Command line:
    python -m lra.pathfinder --out_dir DIR --resolution 32 --difficulty hard --num N --seed S
        writes N generated images in the release layout under DIR (read back with
        data.data_dir=DIR);
    python -m lra.pathfinder render --out grid.png [--resolution 32 --difficulty hard
        --num 16 --seed 0 | --data_dir DIR]   a labelled grid of samples for a person to look at.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import threading

import numpy as np

from lra import _pathfinder_gen as gen
from lra._data import add_processes, at_least, progress, spawn_without_main
from lra.base import BatchSource, PixelSource, Task, register_task

DIFFICULTIES = gen.DIFFICULTIES
DIFFICULTY_DIRS = gen.DIFFICULTY_DIRS
RESOLUTIONS = tuple(sorted(gen.RESOLUTIONS))
NUM_CLASSES = 2
VOCAB_SIZE = 256
SPLIT_OFFSETS = {"train": 0, "validation": 10**9, "test": 2 * 10**9}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)        # release data: train / validation / test
# grain pickles the dataset for its workers from several threads at once: without this lock two
# of them could each move the memo into a file of its own, and one worker's images would be lost
_SHARE_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- sources
class GeneratedSource(BatchSource):
    """Examples offset .. offset + num - 1 of the generated stream; random access.

    get_batch generates the images it has not made yet in one vectorised call and (memoize)
    keeps them, so later epochs cost a gather. Pickled (for the pipeline's worker processes),
    the memo moves into a file that every copy maps: an image drawn by any worker is drawn once
    for all of them and for this process (a race draws it twice, identically)."""

    def __init__(self, settings: gen.Settings, seed: int, offset: int, num: int,
                 memoize: bool = True):
        self.settings, self.seed, self.offset, self.num = settings, seed, offset, num
        side = settings.resolution
        self.memoize = memoize
        self._shared = None                 # path of the memo file once shared
        if memoize:   # np.zeros pages are only allocated when written
            self._store = np.zeros((num, side * side), np.uint8)
            self._have = np.zeros(num, bool)

    def pending(self, indices) -> int:
        """How many of these examples get_batch would draw (not memoized yet)."""
        indices = np.asarray(indices, np.int64)
        return len(indices) if not self.memoize else int((~self._have[indices]).sum())

    def _map(self, path: str, mode: str) -> None:
        pixels = self.settings.resolution ** 2
        self._have = np.memmap(path, np.bool_, mode, offset=0, shape=(self.num,))
        self._store = np.memmap(path, np.uint8, mode, offset=self.num,
                                shape=(self.num, pixels))

    def _share(self) -> str:
        """Moves the memo into a (sparse) file under the temp dir, removed with this object."""
        with _SHARE_LOCK:
            if self._shared is None:
                self._shared = self._move_to_file()
        return self._shared

    def _move_to_file(self) -> str:
        """Copies the memo into a new (sparse) file under the temp dir and maps it there."""
        import shutil
        import tempfile
        import weakref

        folder = tempfile.mkdtemp(prefix="lra_pathfinder_memo_")
        path = os.path.join(folder, "memo.u8")
        have, store = self._have, self._store
        with open(path, "wb") as f:
            f.truncate(self.num * (1 + store.shape[1]))
        self._map(path, "r+")
        done = np.flatnonzero(have)
        self._store[done] = store[done]
        self._have[done] = True
        weakref.finalize(self, shutil.rmtree, folder, True)
        return path

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.memoize:
            state.update(_shared=self._share(), _store=None, _have=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.memoize:
            self._map(self._shared, "r+")

    def __len__(self):
        return self.num

    def labels(self) -> np.ndarray:
        return gen.labels_for(self.seed, self.offset + np.arange(self.num))

    def images(self, indices) -> np.ndarray:
        """uint8 [B, R * R] of examples `indices`."""
        indices = np.asarray(indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num):
            raise IndexError(f"pathfinder: index out of range 0..{self.num - 1}")
        if not self.memoize:
            imgs, _ = gen.generate(self.settings, self.seed, self.offset + indices)
            return imgs.reshape(len(indices), -1)
        missing = np.unique(indices[~self._have[indices]])
        if len(missing):
            imgs, _ = gen.generate(self.settings, self.seed, self.offset + missing)
            self._store[missing] = imgs.reshape(len(missing), -1)
            self._have[missing] = True
        return self._store[indices]

    def make(self, indices) -> None:
        """Draws the examples of `indices` not memoized yet in one call (memoize only)."""
        if self.memoize:
            self.images(indices)

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        pixels = self.images(indices)
        labels = gen.labels_for(self.seed, self.offset + indices)
        return {"inputs": pixels.astype(np.int32), "mask": np.ones(pixels.shape, bool),
                "label": labels}



# ----------------------------------------------------------------------------- release format
def release_dir(data_dir: str, resolution: int, difficulty: str) -> str:
    """The folder holding imgs/ and metadata/; FileNotFoundError naming the expected layout."""
    sub = DIFFICULTY_DIRS[difficulty]
    candidates = [os.path.join(data_dir, f"pathfinder{resolution}", sub),
                  os.path.join(data_dir, sub), data_dir]
    for c in candidates:
        if os.path.isdir(os.path.join(c, "metadata")):
            return c
    raise FileNotFoundError(
        f"pathfinder: no Pathfinder-{resolution} ({difficulty}) data in data.data_dir="
        f"{data_dir!r}. Expected {os.path.join(data_dir, f'pathfinder{resolution}', sub)}/ with "
        f"imgs/<batch>/sample_<i>.png and metadata/<batch>.npy (rows: imgs/<batch> "
        f"sample_<i>.png <i> <label> ...), as in the LRA release "
        f"(https://storage.googleapis.com/long-range-arena/lra_release.gz, folder "
        f"pathfinder{resolution}/{sub}) or as written by `python -m lra.pathfinder --out_dir "
        f"DIR --resolution {resolution} --difficulty {difficulty}`; or leave data.data_dir "
        f"empty to generate the data on the fly.")


def _batch_key(path: str):
    stem = os.path.splitext(os.path.basename(path))[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def read_metadata(path: str) -> list[tuple[str, str, int]]:
    """Rows (subdir, filename, label) of one metadata file (whitespace text, or a .npy array
    of strings). ValueError naming the file and line for a malformed row."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\x93NUMPY"):
        import io
        table = np.load(io.BytesIO(raw), allow_pickle=False)
        lines = [" ".join(str(x) for x in np.atleast_1d(row)) for row in np.atleast_2d(table)]
    else:
        lines = raw.decode("utf-8", "replace").splitlines()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        cols = line.split()
        if not cols:
            continue
        if len(cols) < 4:
            raise ValueError(f"{path}:{lineno}: expected at least 4 whitespace-separated fields "
                             f"(subdir, filename, index, label, ...); got {len(cols)}")
        try:
            label = int(float(cols[3]))
            if label not in (0, 1):
                raise ValueError(f"label {cols[3]!r} is not 0 or 1")
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: bad label: {e}") from None
        rows.append((cols[0], cols[1], label))
    return rows


def decode_png(path: str, resolution: int):
    """uint8 [R, R], or None when the file is empty or unreadable."""
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return None
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L"))
    except (OSError, ValueError, SyntaxError):
        return None
    if arr.shape != (resolution, resolution):
        raise ValueError(f"pathfinder: {path} is {arr.shape[1]} x {arr.shape[0]} pixels; "
                         f"expected {resolution} x {resolution} (data.resolution)")
    return arr


def read_release(base: str, resolution: int):
    """-> (pixels uint8 [N, R * R], labels int32 [N], skipped: list of paths)."""
    meta = sorted(glob.glob(os.path.join(base, "metadata", "*.npy")), key=_batch_key)
    if not meta:
        raise FileNotFoundError(f"pathfinder: no metadata/*.npy files in {base}")
    pixels, labels, skipped = [], [], []
    for m in meta:
        for subdir, filename, label in read_metadata(m):
            path = os.path.join(base, subdir, filename)
            arr = decode_png(path, resolution) if os.path.exists(path) else None
            if arr is None:
                skipped.append(path)
                continue
            pixels.append(arr.reshape(-1))
            labels.append(label)
    if not pixels:
        raise FileNotFoundError(f"pathfinder: no readable images listed in {base}/metadata")
    return np.stack(pixels), np.asarray(labels, np.int32), skipped


def load_release(base: str, resolution: int, cache_dir: str | None):
    """read_release through a cache of .npy files under cache_dir, keyed by the metadata files
    and the size and modification time of every image they list (a changed image is noticed)."""
    meta = sorted(glob.glob(os.path.join(base, "metadata", "*.npy")))
    h = hashlib.sha1(f"{os.path.abspath(base)}:{resolution}".encode())
    for m in meta:
        st = os.stat(m)
        h.update(f"{m}:{st.st_size}:{st.st_mtime_ns}".encode())
        for subdir, filename, _ in read_metadata(m):
            try:
                st = os.stat(os.path.join(base, subdir, filename))
                h.update(f"{subdir}/{filename}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{subdir}/{filename}:missing".encode())
    cache = os.path.join(cache_dir, "pathfinder", h.hexdigest()[:16]) if cache_dir else None
    if cache and os.path.exists(os.path.join(cache, "DONE")):
        with open(os.path.join(cache, "DONE")) as f:
            skipped = json.load(f)["skipped"]
        return (np.load(os.path.join(cache, "pixels.npy"), mmap_mode="r"),
                np.load(os.path.join(cache, "labels.npy")), skipped)
    pixels, labels, skipped = read_release(base, resolution)
    if cache:
        try:
            os.makedirs(cache, exist_ok=True)
            np.save(os.path.join(cache, "pixels.npy"), pixels)
            np.save(os.path.join(cache, "labels.npy"), labels)
            with open(os.path.join(cache, "DONE"), "w") as f:
                json.dump({"source": os.path.abspath(base), "skipped": skipped}, f)
        except OSError:
            pass
    return pixels, labels, skipped


def split_release(n: int) -> dict[str, tuple[int, int]]:
    """80/10/10 index ranges."""
    a = int(n * SPLIT_FRACTIONS[0])
    b = a + int(n * SPLIT_FRACTIONS[1])
    return {"train": (0, a), "validation": (a, b), "test": (b, n)}


# ----------------------------------------------------------------------------- task
def _build(cfg, name: str, default_resolution: int) -> Task:
    resolution = int(cfg.get("resolution", default_resolution))
    difficulty = cfg.get("difficulty", "hard")
    st = gen.settings(resolution, difficulty)       # validates both
    if cfg.max_len != resolution * resolution:
        raise ValueError(f"{name}: data.max_len must be resolution^2 = {resolution ** 2} "
                         f"(data.resolution={resolution}); got {cfg.max_len!r}")
    info = {"resolution": resolution, "difficulty": difficulty}
    if cfg.get("data_dir", ""):
        base = release_dir(cfg.data_dir, resolution, difficulty)
        pixels, labels, skipped = load_release(base, resolution, cfg.get("cache_dir", ""))
        ranges = split_release(len(labels))
        splits = {s: PixelSource(pixels[a:b], labels[a:b]) for s, (a, b) in ranges.items()}
        info.update(origin=f"release files in {base}", skipped_images=len(skipped),
                    skipped_examples=skipped[:5])
    else:
        seed = int(cfg.get("gen_seed", 0))
        sizes = {"train": cfg.num_train, "validation": cfg.num_val, "test": cfg.num_test}
        for s, v in sizes.items():
            if v < 1:
                raise ValueError(f"{name}: data.num_{'val' if s == 'validation' else s} must "
                                 f"be >= 1; got {v!r}")
        memoize = bool(cfg.get("memoize", True))
        splits = {s: GeneratedSource(st, seed, SPLIT_OFFSETS[s], int(v), memoize)
                  for s, v in sizes.items()}
        info.update(origin=f"generated on the fly (seed {seed})")
    info.update({f"num_{k}": len(v) for k, v in splits.items()})
    return Task(name=name, splits=splits, num_classes=NUM_CLASSES, vocab_size=VOCAB_SIZE,
                max_len=resolution * resolution, grid_shape=(resolution, resolution), info=info)


@register_task("pathfinder")
def build(cfg) -> Task:
    return _build(cfg, "pathfinder", 32)


@register_task("pathx")
def build_pathx(cfg) -> Task:
    return _build(cfg, "pathx", 128)


# ----------------------------------------------------------------------------- command line
def _write_chunk(args) -> tuple[int, list[tuple[int, str]]]:
    """Writes the PNGs of images lo..hi-1 into imgs/<batch>/; -> (batch, metadata rows)."""
    from PIL import Image

    base, resolution, difficulty, seed, batch, first, lo, hi = args
    st = gen.settings(resolution, difficulty)
    sub = f"imgs/{batch}"
    os.makedirs(os.path.join(base, sub), exist_ok=True)
    idx = np.arange(lo, hi)
    images, labels = gen.generate(st, seed, idx)
    margins = gen.margins_for(st, seed, idx)
    rows = []
    for i, img, label, margin in zip(idx, images, labels, margins):
        k = int(i - first)
        Image.fromarray(img).save(os.path.join(base, sub, f"sample_{k}.png"))
        rows.append((k, f"{sub} sample_{k}.png {k} {int(label)} {st.continuity} "
                        f"{st.contour_length} {st.distractor_length} {st.paddle_length} "
                        f"{st.paddle_thickness} {int(margin)} 1"))
    return batch, rows


def write_release(out_dir: str, resolution: int, difficulty: str, num: int, seed: int,
                  per_batch: int = 1000, chunk: int = 256, processes: int = 1,
                  progress_bar: bool = False) -> str:
    """Writes generated images 0..num-1 in the release layout; returns the folder.
    Chunks of `chunk` images are drawn in `processes` spawned worker processes when > 1; the
    files do not depend on it (image i is a function of (seed, i)). progress_bar: count, rate
    and ETA on stderr."""
    gen.settings(resolution, difficulty)            # validates
    if num < 1 or per_batch < 1 or chunk < 1 or processes < 1:
        raise ValueError(f"pathfinder: num, per_batch, chunk and processes must be >= 1; got "
                         f"{num}, {per_batch}, {chunk}, {processes}")
    base = os.path.join(out_dir, f"pathfinder{resolution}", DIFFICULTY_DIRS[difficulty])
    os.makedirs(os.path.join(base, "metadata"), exist_ok=True)
    jobs, batches = [], -(-num // per_batch)
    for b in range(batches):
        first, last = b * per_batch, min((b + 1) * per_batch, num)
        jobs += [(base, resolution, difficulty, seed, b, first, lo, min(lo + chunk, last))
                 for lo in range(first, last, chunk)]
    rows: dict[int, list] = {b: [] for b in range(batches)}
    left = {b: sum(1 for j in jobs if j[4] == b) for b in range(batches)}
    bar = progress(num, f"pathfinder{resolution} {difficulty}: generating", "img") \
        if progress_bar else None
    pool = None
    if min(processes, len(jobs)) > 1:
        import multiprocessing

        with spawn_without_main():
            pool = multiprocessing.get_context("spawn").Pool(min(processes, len(jobs)))
    try:
        done = pool.imap_unordered(_write_chunk, jobs) if pool else map(_write_chunk, jobs)
        for b, chunk_rows in done:
            rows[b] += chunk_rows
            left[b] -= 1
            if not left[b]:   # a batch's metadata is written once all its images are
                with open(os.path.join(base, "metadata", f"{b}.npy"), "w") as f:
                    f.write("\n".join(r for _, r in sorted(rows.pop(b))) + "\n")
            if bar is not None:
                bar.update(len(chunk_rows))
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return base


def render_grid(images: np.ndarray, labels: np.ndarray, out: str, cols: int = 8,
                scale: int | None = None) -> None:
    """A PNG grid of images, each with its label written above it."""
    from PIL import Image, ImageDraw

    n, side = len(images), images.shape[1]
    scale = scale or max(1, 128 // side)
    cols = min(cols, n)
    rows = -(-n // cols)
    cell, head, pad = side * scale, 14, 4
    canvas = Image.new("L", (cols * (cell + pad) + pad, rows * (cell + head + pad) + pad), 64)
    draw = ImageDraw.Draw(canvas)
    for k, (img, label) in enumerate(zip(images, labels)):
        r, c = divmod(k, cols)
        x, y = pad + c * (cell + pad), pad + r * (cell + head + pad)
        draw.text((x, y), f"#{k} label {int(label)} ({'joined' if label else 'apart'})",
                  fill=255)
        tile = Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (x, y + head))
    canvas.save(out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["render"]:
        p = argparse.ArgumentParser(prog="python -m lra.pathfinder render",
                                    description="Render labelled Pathfinder samples to a PNG.")
        p.add_argument("--out", required=True, help="PNG file to write")
        p.add_argument("--resolution", type=int, default=32, choices=RESOLUTIONS)
        p.add_argument("--difficulty", default="hard", choices=list(DIFFICULTIES))
        p.add_argument("--num", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--start", type=int, default=0, help="first example index")
        p.add_argument("--data_dir", default="", help="render release files instead")
        p.add_argument("--cols", type=int, default=8)
        a = p.parse_args(argv[1:])
        if a.data_dir:
            base = release_dir(a.data_dir, a.resolution, a.difficulty)
            pixels, labels, _ = read_release(base, a.resolution)
            sl = slice(a.start, a.start + a.num)
            images = pixels[sl].reshape(-1, a.resolution, a.resolution)
            labels = labels[sl]
        else:
            images, labels = gen.generate(gen.settings(a.resolution, a.difficulty), a.seed,
                                          np.arange(a.start, a.start + a.num))
        render_grid(images, labels, a.out, cols=a.cols)
        print(f"wrote {a.out} ({len(images)} images)")
        return
    p = argparse.ArgumentParser(
        prog="python -m lra.pathfinder",
        description="Generate Pathfinder images in the LRA release layout "
                    "(or: python -m lra.pathfinder render --out grid.png ...).")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--resolution", type=int, default=32, choices=RESOLUTIONS)
    p.add_argument("--difficulty", default="hard", choices=list(DIFFICULTIES))
    p.add_argument("--num", type=at_least(1), default=200000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per_batch", type=at_least(1), default=1000,
                   help="images per imgs/<batch> folder")
    add_processes(p, "drawing images")
    a = p.parse_args(argv)
    base = write_release(a.out_dir, a.resolution, a.difficulty, a.num, a.seed, a.per_batch,
                         processes=a.processes, progress_bar=True)
    print(f"wrote {a.num} images to {base}")


if __name__ == "__main__":
    main()
