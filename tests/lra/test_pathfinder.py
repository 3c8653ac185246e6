"""Pathfinder generator (properties of a sample), task sources, release reader/writer, CLI."""

import functools
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

import lra
from configs import pathfinder as pf_config
from lra import _pathfinder_gen as gen
from lra import pathfinder
from tests.lra.conftest import tiny_data

SAMPLE = 200


@pytest.fixture(scope="module")
def sample32():
    st = gen.settings(32, "hard")
    images, labels, markers = gen.generate(st, 7, np.arange(SAMPLE), return_markers=True)
    return st, images, labels, markers


def joined(image, p, q, gap):
    """Are pixels nearest p and q linked by drawn pixels (> 0) with steps of at most `gap` px?"""
    pts = np.argwhere(image > 0)
    tree = cKDTree(pts)
    pairs = tree.query_pairs(gap, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(pts),) * 2)
    _, comp = connected_components(graph, directed=False)
    return comp[tree.query(p)[1]] == comp[tree.query(q)[1]]


def test_labels_balanced():
    labels = gen.labels_for(3, np.arange(4000))
    assert abs(labels.mean() - 0.5) < 0.03


def test_two_markers_in_every_image(sample32):
    st, images, _, markers = sample32
    assert images.shape == (SAMPLE, 32, 32) and images.dtype == np.uint8
    for img, mk in zip(images, markers):
        # paddles are drawn at contrast 0.75 with thickness 0.5 (<= 96); markers reach 255
        blobs, count = ndimage.label(img > 160)
        assert count == 2
        centres = np.asarray(ndimage.center_of_mass(img > 160, blobs, [1, 2]))
        d = np.linalg.norm(centres[:, None] - mk[None], axis=-1)
        assert min(d[0, 0] + d[1, 1], d[0, 1] + d[1, 0]) < 2.0


def test_markers_joined_by_a_path_of_drawn_pixels_iff_label(sample32):
    # Paddles of one contour are 2 * margin apart: a path may step over gaps of 2m (+0.3 px).
    st, images, labels, markers = sample32
    gap = 2 * st.margins[0] + 0.3
    agree = np.asarray([joined(img, m[0], m[1], gap) == bool(lab)
                        for img, lab, m in zip(images, labels, markers)])
    assert agree[labels == 1].mean() >= 0.97
    assert agree.mean() >= 0.95


def test_ink_does_not_give_the_label_away(sample32):
    _, images, labels, _ = sample32
    drawn = (images.reshape(SAMPLE, -1) > 0).sum(1).astype(float)
    a, b = drawn[labels == 1], drawn[labels == 0]
    assert abs(a.mean() - b.mean()) < 0.35 * np.sqrt((a.var() + b.var()) / 2)


def test_random_access_is_deterministic():
    st = gen.settings(32, "easy")
    batch, labels = gen.generate(st, 11, [5, 2, 9])
    alone, alone_label = gen.generate(st, 11, [9])
    np.testing.assert_array_equal(batch[2], alone[0])
    assert labels[2] == alone_label[0] == gen.labels_for(11, [9])[0]
    other, _ = gen.generate(st, 12, [9])
    assert (other[0] != alone[0]).any()


@pytest.mark.parametrize("resolution", [64, 128])
def test_larger_resolutions(resolution):
    st = gen.settings(resolution, "intermediate")
    images, labels, markers = gen.generate(st, 0, np.arange(4), return_markers=True)
    assert images.shape == (4, resolution, resolution)
    for img, mk, lab in zip(images, markers, labels):
        for p in np.rint(mk).astype(int):
            assert img[p[0], p[1]] == 255                     # marker centres are filled discs
        assert (img > 0).mean() > 0.03                         # contours and distractors drawn


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="resolution must be one of"):
        gen.settings(48, "hard")
    with pytest.raises(ValueError, match="difficulty must be one of"):
        gen.settings(32, "medium")


_cfg = functools.partial(tiny_data, pf_config)     # the tiny data config, fields changed


def test_generated_task_sources():
    task = lra.get_task(_cfg(num_train=16, num_val=4, num_test=4))
    assert task.grid_shape == (32, 32) and task.max_len == 1024 and task.vocab_size == 256
    src = task.splits["train"]
    batch = src.get_batch(np.array([3, 1, 3]))
    assert batch["inputs"].shape == (3, 1024) and batch["inputs"].dtype == np.int32
    assert batch["mask"].all()
    want, want_labels = gen.generate(gen.settings(32, "hard"), 0, [3, 1])
    np.testing.assert_array_equal(batch["inputs"][:2], want.reshape(2, -1))
    np.testing.assert_array_equal(batch["label"][:2], want_labels)
    np.testing.assert_array_equal(src.labels()[[3, 1]], want_labels)
    test_img = task.splits["test"].get_batch(np.array([3]))["inputs"]
    assert (test_img != batch["inputs"][0]).any()              # splits are disjoint streams
    with pytest.raises(ValueError, match="max_len must be resolution"):
        lra.get_task(_cfg(max_len=64))


def test_release_round_trip_skips_unreadable_images(tmp_path):
    base = pathfinder.write_release(str(tmp_path), 32, "hard", num=23, seed=5, per_batch=10)
    assert base == os.path.join(str(tmp_path), "pathfinder32", "curv_contour_length_14")
    assert sorted(os.listdir(os.path.join(base, "metadata"))) == ["0.npy", "1.npy", "2.npy"]
    cfg = _cfg(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    task = lra.get_task(cfg)
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [18, 2, 3]
    images, labels = gen.generate(gen.settings(32, "hard"), 5, np.arange(23))
    got = np.concatenate([task.splits[s].get_batch(np.arange(len(task.splits[s])))["inputs"]
                          for s in ("train", "validation", "test")])
    np.testing.assert_array_equal(got, images.reshape(23, -1))
    np.testing.assert_array_equal(
        np.concatenate([task.splits[s].labels() for s in ("train", "validation", "test")]), labels)
    # the cache notices an image that changed behind the same metadata
    first, second = (os.path.join(base, "imgs", "0", f"sample_{i}.png") for i in (0, 1))
    shutil.copyfile(first, first + ".orig")
    shutil.copyfile(second, first)
    task = lra.get_task(cfg)
    np.testing.assert_array_equal(task.splits["train"][0]["inputs"], images[1].reshape(-1))
    shutil.move(first + ".orig", first)
    # an empty and a corrupt PNG (the release has such files) are skipped and counted
    open(os.path.join(base, "imgs", "1", "sample_0.png"), "wb").close()
    with open(os.path.join(base, "imgs", "2", "sample_1.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    task = lra.get_task(_cfg(data_dir=str(tmp_path), cache_dir=""))
    assert task.info["skipped_images"] == 2
    got = np.concatenate([task.splits[s].get_batch(np.arange(len(task.splits[s])))["inputs"]
                          for s in ("train", "validation", "test")])
    keep = np.setdiff1d(np.arange(23), [10, 21])
    np.testing.assert_array_equal(got, images.reshape(23, -1)[keep])


def test_malformed_metadata_and_missing_release(tmp_path):
    base = tmp_path / "pathfinder32" / "curv_contour_length_14"
    os.makedirs(base / "metadata")
    (base / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 1\nimgs/0 sample_1.png 1\n")
    with pytest.raises(ValueError, match=r"0\.npy:2: expected at least 4"):
        pathfinder.read_metadata(str(base / "metadata" / "0.npy"))
    with pytest.raises(FileNotFoundError) as e:
        lra.get_task(_cfg(data_dir=str(tmp_path / "elsewhere")))
    msg = str(e.value)
    assert "pathfinder32" in msg and "curv_contour_length_14" in msg and "lra_release" in msg


def test_command_line_writes_release_and_renders_grid(tmp_path):
    pathfinder.main(["--out_dir", str(tmp_path), "--resolution", "32", "--difficulty", "easy",
                     "--num", "3", "--seed", "1"])
    png = tmp_path / "pathfinder32" / "curv_baseline" / "imgs" / "0" / "sample_2.png"
    want, _ = gen.generate(gen.settings(32, "easy"), 1, [2])
    np.testing.assert_array_equal(np.asarray(Image.open(png)), want[0])
    out = tmp_path / "grid.png"
    pathfinder.main(["render", "--out", str(out), "--num", "4", "--cols", "2"])
    grid = Image.open(out)
    assert grid.size == (2 * (128 + 4) + 4, 2 * (128 + 14 + 4) + 4)


def test_release_files_do_not_depend_on_the_number_of_processes(tmp_path):
    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file()}
    for procs in (1, 2):
        pathfinder.write_release(str(tmp_path / f"p{procs}"), 32, "easy", num=13, seed=2,
                                 per_batch=5, chunk=3, processes=procs)
    one, two = files(tmp_path / "p1"), files(tmp_path / "p2")
    assert one == two and sum(n.endswith(".png") for n in one) == 13
    meta = (tmp_path / "p2" / "pathfinder32" / "curv_baseline" / "metadata" / "1.npy").read_text()
    assert [row.split()[1] for row in meta.splitlines()] == [f"sample_{k}.png" for k in range(5)]
    with pytest.raises(ValueError, match="processes must be >= 1"):
        pathfinder.write_release(str(tmp_path), 32, "easy", num=2, seed=0, processes=0)
