"""Pathfinder images (Linsley et al., 2018, "Learning long-range spatial dependencies with
horizontal gated recurrent units"; Kim, Linsley et al., 2020), the generator behind LRA's
Pathfinder and Path-X, re-implemented in numpy and vectorised over a batch of images.

Recipe per image (snakes2 of drewlinsley/pathfinder, LRA settings per resolution below):
  label ~ U{0, 1}; a paddle margin m from the resolution's list.
  Two target snakes grow in lockstep from two seed paddles: seed 1 in the centre of the image
  (outside a band of 2 * seed_distance), seed 2 at seed_distance from it in a random direction.
  A snake is `contour_length` paddles (segments of paddle_length px and paddle_thickness). Each
  new paddle starts 2m beyond the previous one's tip: with pivot p' = p + (L + 2m) dir(theta),
  candidate paddles run from p' + m dir(phi) to p' + (L + m) dir(phi) for phi on a circle of
  radius L + m (one candidate per pixel of arc), weighted by cos(min(|phi - theta| *
  continuity, pi/2))^2 (smooth turns), and those that come within the separation of anything
  already drawn (the occupancy mask dilated by the margin; the snake's own previous paddle
  excepted) are excluded. A target snake that cannot grow restarts the image.
  Then num_distractor snakes of contour_length // 3 paddles (discarded when they cannot grow;
  up to 5 tries each) and single paddles fill the image up to
  int(150 * 123.5 / (7.5 + 13 m + 4 m^2)) paddles in total or until no place is free.
  Markers: a disc of marker_radius at the origin tip of one target snake, a second at the
  terminal tip of the same snake (label 1) or of the other one (label 0). Paddles and markers are
  anti-aliased; every paddle (target or distractor) has the same contrast, so neither ink
  amount, marker count nor snake count gives the label away: only tracing does.

Deviations from snakes2 (kept small; none changes what is drawn in kind):
  - geometry is in floating point (snakes2 rounds pivots to integers), and anti-aliasing is the
    exact box-filter coverage of a segment of the paddle's thickness (the limit of drawing at a
    higher scale and reducing, which snakes2 does with PIL at 2x and a Lanczos filter);
  - where snakes2 samples a candidate and retries up to 3 times when it collides, we sample
    among the candidates that do not collide (the same distribution, conditioned on success);
  - single paddles stop after 2 attempts in a row find no free place (snakes2: when less than 1%
    of the image is free).
Two choices go a little beyond snakes2 so that the drawn contours decide the label:
  - paddles of different contours keep separation(m) = 2m + thickness + 1 px between centre
    lines (snakes2's dilated masks give about 2m + thickness, barely more than the 2m gap
    between consecutive paddles of one contour);
  - the snake a marker is not on, and everything drawn later, keeps the marker clearance
    (separation + marker_radius) from that marker, so a marker never touches another contour.
With these, whether the markers are joined by drawn pixels (stepping over gaps <= 2m) agrees
with the label on ~98% of hard PF-32 images (tests/lra/test_pathfinder.py).
Random numbers come from a counter-based hash of (seed, index, attempt, position in the
recipe), so image `index` is the same whichever batch it is generated in: random access.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

DIFFICULTIES = {"easy": 6, "intermediate": 9, "hard": 14}        # contour length (paddles)
DIFFICULTY_DIRS = {"easy": "curv_baseline", "intermediate": "curv_contour_length_9",
                   "hard": "curv_contour_length_14"}             # release folder names

# Per-resolution settings of LRA's Pathfinder data (the LRA repo's pathfinder TFDS builder lists
# the snakes2 arguments it was generated with; unlisted ones are snakes2's defaults).
RESOLUTIONS = {
    32: dict(padding=1, paddle_length=2, paddle_thickness=0.5, margins=(1,), marker_radius=1.5,
             seed_distance=7, continuity=1.0, contrast=0.75, distractor_budget=20),
    64: dict(padding=1, paddle_length=5, paddle_thickness=1.0, margins=(1,), marker_radius=2.5,
             seed_distance=12, continuity=1.8, contrast=1.0, distractor_budget=22),
    128: dict(padding=1, paddle_length=5, paddle_thickness=1.5, margins=(2, 3), marker_radius=3.0,
              seed_distance=20, continuity=1.8, contrast=1.0, distractor_budget=35),
    256: dict(padding=22, paddle_length=5, paddle_thickness=2.0, margins=(3,), marker_radius=5.0,
              seed_distance=27, continuity=1.8, contrast=1.0, distractor_budget=30),
}

_DISTRACTOR_TRIES = 5       # snakes2: max_distractor_contour_retrial = 4 -> 5 tries
_SEED_CANDIDATES = 32       # placements drawn at once when seeding a distractor or single paddle
_SINGLE_STOP_AFTER = 2      # attempts in a row without a free place end the single paddles
_MAX_ATTEMPTS = 256         # restarts of an image whose target snakes could not grow


@dataclasses.dataclass(frozen=True)
class Settings:
    resolution: int
    contour_length: int
    padding: int
    paddle_length: float
    paddle_thickness: float
    margins: tuple
    marker_radius: float
    seed_distance: float
    continuity: float
    contrast: float
    distractor_budget: int
    use_single_paddles: bool = True

    @property
    def distractor_length(self) -> int:
        return max(1, self.contour_length // 3)

    @property
    def num_distractors(self) -> int:
        return self.distractor_budget // self.distractor_length

    def total_paddles(self, margin: int) -> int:
        return int(150 * 123.5 / (7.5 + 13 * margin + 4 * margin * margin))

    def separation(self, margin: int) -> float:
        """Least distance (px) between the centre lines of paddles not adjacent on one snake:
        both paddles dilated by the margin must not overlap (snakes2's occupancy test)."""
        return 2 * margin + self.paddle_thickness + 1.0

    def marker_clearance(self, margin: int) -> float:
        """Least distance from a snake tip (where a marker may go) to other contours."""
        return self.separation(margin) + self.marker_radius


def settings(resolution: int, difficulty: str, **overrides) -> Settings:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"pathfinder: resolution must be one of {sorted(RESOLUTIONS)}; "
                         f"got {resolution!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"pathfinder: difficulty must be one of {list(DIFFICULTIES)}; "
                         f"got {difficulty!r}")
    return Settings(resolution=resolution, contour_length=DIFFICULTIES[difficulty],
                    **{**RESOLUTIONS[resolution], **overrides})


# ----------------------------------------------------------------------------- random numbers
_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _combine(*parts: int) -> np.uint64:
    h = np.uint64(0x51ED270B27A5B2C3)
    for p in parts:
        h = _mix(h ^ np.uint64(p & _M64))
    return h


def image_keys(seed: int, indices: np.ndarray, attempt: int | np.ndarray = 0) -> np.ndarray:
    """uint64 key per image: a hash of (seed, index, attempt)."""
    base = _mix(np.asarray(indices, np.uint64) ^ _combine(seed, 0x5A7E))
    with np.errstate(over="ignore"):
        return _mix(base + np.asarray(attempt, np.uint64) * _GOLDEN)


def uniform(keys: np.ndarray, slot: tuple, count: int = 1) -> np.ndarray:
    """U[0, 1) float64 [n, count] for draw position `slot` (a tuple of ints) of each key."""
    s = _combine(*slot)
    base = _mix(keys ^ s)
    with np.errstate(over="ignore"):
        z = _mix(base[:, None] + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def labels_for(seed: int, indices: np.ndarray) -> np.ndarray:
    """The label of each image (drawn first, independently of the drawing): int32 [n]."""
    return (uniform(image_keys(seed, indices), (1,))[:, 0] < 0.5).astype(np.int32)


def margins_for(st: Settings, seed: int, indices: np.ndarray) -> np.ndarray:
    u = uniform(image_keys(seed, indices), (2,))[:, 0]
    return np.asarray(st.margins)[np.minimum((u * len(st.margins)).astype(int),
                                             len(st.margins) - 1)]


# ----------------------------------------------------------------------------- geometry
def _dir(theta):
    return np.stack([np.sin(theta), np.cos(theta)], axis=-1)   # (dy, dx)


def _point_segment_distance(p, a, b):
    """p [..., 2], a/b broadcastable [..., 2] -> [...] distance from p to segment ab."""
    py, px = p[..., 0] - a[..., 0], p[..., 1] - a[..., 1]
    ay, ax = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    t = np.clip((py * ay + px * ax) / np.maximum(ay * ay + ax * ax, 1e-12), 0.0, 1.0)
    dy, dx = py - t * ay, px - t * ax
    return np.sqrt(dy * dy + dx * dx)


def _coverage(d, width):
    """Box-filter coverage of a pixel by a stroke of `width` whose centre line is at distance d."""
    return np.maximum(0.0, np.minimum(d + width / 2, 0.5) - np.maximum(d - width / 2, -0.5))


class _Canvas:
    """A batch of images being drawn: ink [n, S, S] and the occupancy (forbidden) map."""

    def __init__(self, st: Settings, margin: int, n: int):
        self.st, self.m, self.n = st, margin, n
        self.L = float(st.paddle_length)
        self.sep = st.separation(margin)
        self.clearance = st.marker_clearance(margin)
        # window half-sizes: around a paddle's midpoint, and around a disc's centre
        self.Rp = int(math.ceil(self.L / 2 + max(self.sep, st.paddle_thickness / 2 + 1.0))) + 1
        self.Rd = int(math.ceil(max(self.clearance, st.marker_radius + 1.0))) + 1
        self.off = max(self.Rp, self.Rd) + 1                 # canvas border (outside the image)
        h = st.resolution
        size = h + 2 * self.off
        self.ink = np.zeros((n, size, size), np.float32)
        self.forb = np.ones((n, size, size), bool)
        self.forb_empty = np.ones((size, size), bool)
        lo, hi = self.off + st.padding, self.off + h - st.padding
        self.forb_empty[lo:hi, lo:hi] = False
        self.forb[:] = self.forb_empty
        self.free_lo, self.free_hi = st.padding, h - 1 - st.padding   # interior pixel range
        # points sampled along a paddle (spacing <= 0.5 px) for the occupancy test
        self.ts = np.linspace(0.0, 1.0, int(math.ceil(self.L / 0.5)) + 1)

    def clear(self, rows):
        self.ink[rows] = 0.0
        self.forb[rows] = self.forb_empty

    def _window(self, rows, a, b, radius):
        """Distance [k, P, P] from the pixels of a window of half-size `radius` around the
        midpoint of segment a -> b to the segment, and the window's index into the canvas."""
        h = self.st.resolution   # clipping only moves drawings of images that already failed
        c = np.clip(np.rint((a + b) / 2).astype(np.int64), 0, h - 1)   # [k, 2]
        w = np.arange(-radius, radius + 1)
        wf = w.astype(np.float32)
        rel = (c - a).astype(np.float32)[:, :, None, None]         # [k, 2, 1, 1]
        py, px = wf[None, :, None] + rel[:, 0], wf[None, None, :] + rel[:, 1]   # [k,P,1] [k,1,P]
        ab = (b - a).astype(np.float32)[:, :, None, None]
        t = np.clip((py * ab[:, 0] + px * ab[:, 1])
                    / np.maximum(ab[:, 0] ** 2 + ab[:, 1] ** 2, 1e-12), 0.0, 1.0)
        d = np.sqrt((py - t * ab[:, 0]) ** 2 + (px - t * ab[:, 1]) ** 2)   # [k, P, P]
        idx = (rows[:, None, None], c[:, 0, None, None] + w[None, :, None] + self.off,
               c[:, 1, None, None] + w[None, None, :] + self.off)
        return d, idx

    def draw_paddles(self, rows, a, b, *, ink=True, occupy=True):
        """Paddles a -> b ([k, 2] each) into images `rows` (distinct)."""
        if len(rows) == 0:
            return
        d, idx = self._window(rows, a, b, self.Rp)
        if ink:
            cov = (self.st.contrast * _coverage(d, self.st.paddle_thickness)).astype(np.float32)
            self.ink[idx] = np.maximum(self.ink[idx], cov)
        if occupy:
            self.forb[idx] |= d <= self.sep

    def draw_disc(self, rows, centre, radius):
        d, idx = self._window(rows, centre, centre, self.Rd)
        cov = np.clip(radius + 0.5 - d, 0.0, 1.0).astype(np.float32)
        self.ink[idx] = np.maximum(self.ink[idx], cov)

    def points(self, a, b):
        """Points along paddles a -> b [k, C, 2] every <= 0.5 px: [k, C, T, 2]."""
        return a[:, :, None] + self.ts[None, None, :, None] * (b - a)[:, :, None]

    def free(self, rows, pts):
        """bool [k, C]: paddles through points pts [k, C, T, 2] keep clear of everything
        occupied (and of the border)."""
        p = np.clip(np.rint(pts).astype(np.int64) + self.off, 0, self.forb.shape[1] - 1)
        return ~self.forb[rows[:, None, None], p[..., 0], p[..., 1]].any(-1)

    def clear_of(self, pts, seg_a, seg_b, dist=None):
        """bool [k, C]: paddles through points pts [k, C, T, 2] keep `dist` (default: the
        separation) from the segments seg_a -> seg_b [k, 2] (a point where seg_a is seg_b)."""
        d = _point_segment_distance(pts, seg_a[:, None, None], seg_b[:, None, None])
        return d.min(-1) >= (self.sep if dist is None else dist)

    def occupy_disc(self, rows, centre, radius):
        d, idx = self._window(rows, centre, centre, self.Rd)
        self.forb[idx] |= d <= radius

    def images(self) -> np.ndarray:
        h, o = self.st.resolution, self.off
        img = self.ink[:, o:o + h, o:o + h]
        return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _choose(weights, u):
    """Index per row drawn with probability proportional to weights [k, C]; u [k]. -1 if none."""
    total = weights.sum(-1)
    cdf = np.cumsum(weights, -1)
    j = (cdf < (u * total)[:, None]).sum(-1)
    j = np.minimum(j, weights.shape[1] - 1)
    return np.where(total > 0, j, -1)


class _Grower:
    """Extension of snakes by one paddle (the continuity-weighted choice of snakes2)."""

    def __init__(self, cv: _Canvas):
        self.cv = cv
        L, m = cv.L, cv.m
        k = max(8, int(math.ceil(2 * math.pi * (L + m))))     # one candidate per pixel of arc
        self.phi = np.arange(k) * (2 * math.pi / k)            # [C]
        self.dirs = _dir(self.phi)                             # [C, 2]
        # candidate paddle j runs from pivot + m dir(phi_j) to pivot + (L + m) dir(phi_j)
        self.offsets = (m + cv.ts * L)[None, :, None] * self.dirs[:, None, :]   # [C, T, 2]

    def step(self, rows, pivot, theta, u, avoid=()):
        """-> (new pivot, new theta, a, b, ok) for images `rows`.

        pivot [k, 2], theta [k]: the snake's state; u [k] uniforms; avoid: (seg_a, seg_b, on,
        dist) of extra segments [k, 2] to keep `dist` from (on: bool [k] where they apply, or
        None for all; dist None: the separation)."""
        cv = self.cv
        L, m = cv.L, cv.m
        pn = pivot + (L + 2 * m) * _dir(theta)                             # [k, 2]
        pts = pn[:, None, None, :] + self.offsets[None]                    # [k, C, T, 2]
        delta = np.abs((self.phi[None] - theta[:, None] + np.pi) % (2 * np.pi) - np.pi)
        w = np.cos(np.minimum(delta * cv.st.continuity, np.pi / 2)) ** 2   # [k, C]
        ok = cv.free(rows, pts)
        for seg_a, seg_b, on, dist in avoid:
            clear = cv.clear_of(pts, seg_a, seg_b, dist)
            ok &= clear if on is None else clear | ~on[:, None]
        j = _choose(w * ok, u)
        good = j >= 0
        jj = np.maximum(j, 0)
        a = pn + m * self.dirs[jj]
        b = pn + (L + m) * self.dirs[jj]
        return pn, self.phi[jj], a, b, good


def _seed_candidates(cv: _Canvas, keys, slot, count):
    """count random paddles (integer tail, integer-degree orientation) per image."""
    st = cv.st
    u = uniform(keys, slot, 3 * count).reshape(len(keys), count, 3)
    span = cv.free_hi - cv.free_lo + 1
    tail = cv.free_lo + np.minimum((u[..., :2] * span).astype(np.int64), span - 1)
    theta = np.floor(u[..., 2] * 360.0 - 180.0) * (np.pi / 180)
    a = tail.astype(np.float64)
    b = a + st.paddle_length * _dir(theta)
    return a, b, theta


def _first_true(mask):
    j = np.argmax(mask, -1)
    return np.where(mask.any(-1), j, -1)


def _targets(cv: _Canvas, grow: _Grower, rows: np.ndarray, keys: np.ndarray,
             labels: np.ndarray):
    """Draws the two target snakes into images `rows` (keys: one attempt each).

    The origin marker goes on the origin tip of snake o (drawn here), the terminal marker on
    the terminal tip of snake o (label 1) or of the other one (label 0); the snake a marker is
    not on keeps the marker clearance from it (so does everything drawn later).
    -> ok bool [k] (False: a snake could not grow; the image must restart), origin marker and
    terminal marker positions ([k, 2] each)."""
    st, L, m, h = cv.st, cv.L, cv.m, cv.st.resolution
    k = len(rows)
    ok = np.ones(k, bool)
    # seed 1 in the centre (outside a band of 2 * seed_distance), seed 2 at seed_distance
    u = uniform(keys, (10,), 6)
    band = int(2 * st.seed_distance)
    span = max(h - 2 * band, 1)
    tail1 = band + np.minimum((u[:, :2] * span).astype(np.int64), span - 1).astype(np.float64)
    th1 = np.floor(u[:, 2] * 360.0 - 180.0) * (np.pi / 180)
    alpha = np.floor(u[:, 3] * 360.0) * (np.pi / 180)
    tail2 = np.rint(tail1 + st.seed_distance * _dir(alpha))
    th2 = np.floor(u[:, 4] * 360.0 - 180.0) * (np.pi / 180)
    o = (u[:, 5] < 0.5).astype(np.int64)                    # snake of the origin marker
    t = np.where(labels == 1, o, 1 - o)                      # snake of the terminal marker
    tails = [tail1, tail2]
    heads = [tail1 + L * _dir(th1), tail2 + L * _dir(th2)]
    inside = lambda p: np.all((p >= st.padding) & (p <= h - 1 - st.padding), -1)  # noqa: E731
    ok &= inside(tail2) & inside(heads[1])
    seed_pts = [cv.points(tl[:, None], hd[:, None]) for tl, hd in zip(tails, heads)]
    ok &= cv.clear_of(seed_pts[1], tail1, heads[0])[:, 0]
    clr = cv.clearance
    origin = np.where(o[:, None] == 0, tail1, tail2)        # origin marker
    for s in range(2):                                       # the other seed keeps clear of it
        ok &= cv.clear_of(seed_pts[s], origin, origin, clr)[:, 0] | (o == s)
    pending = [[tl.copy(), hd.copy()] for tl, hd in zip(tails, heads)]   # occupancy: a step late
    history = [[(tails[0], heads[0])], [(tails[1], heads[1])]]
    pivot = [tail1 - m * _dir(th1), tail2 - m * _dir(th2)]
    theta = [th1, th2]
    act = np.nonzero(ok)[0]              # images still growing (failed ones are left behind)
    # grow both snakes in lockstep; each avoids the other's newest paddle, and the snake
    # without the origin marker keeps the clearance from it
    for step in range(1, st.contour_length):
        u = uniform(keys[act], (11, step), 2)
        for s in range(2):
            other = pending[1 - s]
            mark = origin[act]
            pn, th, a, b, good = grow.step(
                rows[act], pivot[s][act], theta[s][act], u[:, s],
                avoid=[(other[0][act], other[1][act], None, None),
                       (mark, mark, o[act] != s, clr)])
            ok[act] = good
            cv.draw_paddles(rows[act], pending[s][0][act], pending[s][1][act], ink=False)
            pending[s][0][act], pending[s][1][act] = a, b
            full_a, full_b = np.zeros((k, 2)), np.zeros((k, 2))
            full_a[act], full_b[act] = a, b
            history[s].append((full_a, full_b))
            pivot[s][act], theta[s][act] = pn, th
            act, u = act[good], u[good]
    terminal = np.where(t[:, None] == 0, pending[0][1], pending[1][1])   # terminal marker
    for s in range(2):                   # the snake without it keeps the clearance from it
        for a, b in history[s]:
            far = _point_segment_distance(terminal[act], a[act], b[act]) >= clr
            ok[act] &= far | (t[act] == s)
    act = act[ok[act]]
    for s in range(2):
        cv.draw_paddles(rows[act], pending[s][0][act], pending[s][1][act], ink=False)
        for a, b in history[s]:          # ink only for the images that made it
            cv.draw_paddles(rows[act], a[act], b[act], occupy=False)
    cv.occupy_disc(rows[act], origin[act], clr)
    cv.occupy_disc(rows[act], terminal[act], clr)
    return ok, origin, terminal


def _distractors(cv: _Canvas, grow: _Grower, keys: np.ndarray):
    """Distractor snakes (contour_length // 3 paddles): up to _DISTRACTOR_TRIES tries each,
    a snake that cannot grow is discarded (snakes2: allow_incomplete, no shorter snakes)."""
    st, m, n = cv.st, cv.m, cv.n
    dl = st.distractor_length
    for d in range(st.num_distractors):
        todo = np.ones(n, bool)
        for trial in range(_DISTRACTOR_TRIES):
            rows = np.nonzero(todo)[0]
            if len(rows) == 0:
                break
            rk = keys[rows]
            a0, b0, th0 = _seed_candidates(cv, rk, (20, d, trial), _SEED_CANDIDATES)
            j = _first_true(cv.free(rows, cv.points(a0, b0)))
            alive = j >= 0
            jj = np.maximum(j, 0)
            r = np.arange(len(rows))
            segs = [(a0[r, jj], b0[r, jj])]
            th = th0[r, jj]
            piv = segs[0][0] - m * _dir(th)
            uu = uniform(rk, (21, d, trial), dl)
            for k in range(1, dl):
                avoid = [(sa, sb, alive, None) for sa, sb in segs[:-1]]   # own, but the last
                piv, th, a, b, good = grow.step(rows, piv, th, uu[:, k], avoid=avoid)
                alive &= good
                segs.append((a, b))
            done = rows[alive]
            for sa, sb in segs:
                cv.draw_paddles(done, sa[alive], sb[alive])
            todo[done] = False


def _single_paddles(cv: _Canvas, keys: np.ndarray):
    """Loose paddles up to the paddle budget, each where it keeps clear of everything."""
    st, m = cv.st, cv.m
    budget = st.total_paddles(m) - 2 * st.contour_length - st.num_distractors * \
        st.distractor_length
    fails = np.zeros(cv.n, np.int64)
    for i in range(max(budget, 0)):
        rows = np.nonzero(fails < _SINGLE_STOP_AFTER)[0]
        if len(rows) == 0:
            break
        a0, b0, _ = _seed_candidates(cv, keys[rows], (30, i), _SEED_CANDIDATES)
        j = _first_true(cv.free(rows, cv.points(a0, b0)))
        placed = j >= 0
        fails[rows] = np.where(placed, 0, fails[rows] + 1)
        r = np.nonzero(placed)[0]
        cv.draw_paddles(rows[r], a0[r, j[r]], b0[r, j[r]])


def _draw_group(st: Settings, margin: int, seed: int, indices: np.ndarray, labels: np.ndarray):
    """Images of `indices`, all with paddle margin `margin`.
    -> (uint8 [n, H, W], origin marker [n, 2], terminal marker [n, 2])."""
    n = len(indices)
    cv = _Canvas(st, margin, n)
    grow = _Grower(cv)
    keys = np.zeros(n, np.uint64)
    origin, terminal = np.zeros((n, 2)), np.zeros((n, 2))
    # Target snakes: snakes2 restarts an image until both grow. Attempts 0, 1, 2, ... of an
    # image run in chunks (several side by side on a scratch canvas); the first attempt that
    # succeeds wins, so the image does not depend on the chunking.
    todo, next_attempt, per_image = np.arange(n), 0, 1
    while len(todo):
        if next_attempt >= _MAX_ATTEMPTS:
            raise RuntimeError(f"pathfinder: {len(todo)} images failed {_MAX_ATTEMPTS} attempts "
                               f"to grow their target snakes (settings {st})")
        reps = min(per_image, _MAX_ATTEMPTS - next_attempt)
        img = np.repeat(todo, reps)                                  # [k * reps]
        att = np.tile(np.arange(next_attempt, next_attempt + reps), len(todo))
        scratch = _Canvas(st, margin, len(img))
        rkeys = image_keys(seed, indices[img], att)
        ok, o, t = _targets(scratch, _Grower(scratch), np.arange(len(img)), rkeys, labels[img])
        ok2 = ok.reshape(len(todo), reps)
        first = np.argmax(ok2, 1)
        won = ok2.any(1)
        src = (np.arange(len(todo)) * reps + first)[won]
        dst = todo[won]
        cv.ink[dst], cv.forb[dst] = scratch.ink[src], scratch.forb[src]
        keys[dst], origin[dst], terminal[dst] = rkeys[src], o[src], t[src]
        rate = max(ok.mean(), 1.0 / 16)
        todo, next_attempt = todo[~won], next_attempt + reps
        per_image = int(min(8, math.ceil(1.0 / rate)))
    _distractors(cv, grow, keys)
    if st.use_single_paddles:
        _single_paddles(cv, keys)
    rows = np.arange(n)
    cv.draw_disc(rows, origin, st.marker_radius)
    cv.draw_disc(rows, terminal, st.marker_radius)
    return cv.images(), origin, terminal


def generate(st: Settings, seed: int, indices, *, return_markers: bool = False):
    """Images uint8 [n, H, W] and labels int32 [n] of examples `indices` (random access).

    return_markers: also the marker centres float [n, 2 (marker), 2 (row, col)] for tests."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    n, h = len(indices), st.resolution
    images = np.zeros((n, h, h), np.uint8)
    markers = np.zeros((n, 2, 2), np.float64)
    labels = labels_for(seed, indices)
    margins = margins_for(st, seed, indices)
    for margin in np.unique(margins):
        sel = np.nonzero(margins == margin)[0]
        imgs, m1, m2 = _draw_group(st, int(margin), seed, indices[sel], labels[sel])
        images[sel], markers[sel, 0], markers[sel, 1] = imgs, m1, m2
    if return_markers:
        return images, labels, markers
    return images, labels
