"""Procedural synthetic facial expressions: the embedded default dataset (no download).

Generative model, in drawing order:

1. People. Each of `num_identities` identities draws a fixed look: face ellipse
   (width, height), skin tone, hair style (short, long, bald) and darkness, eye
   spacing, height and size, brow thickness, mouth height and width, background,
   a preferred lighting direction, and sometimes glasses or a beard. Each also
   draws idiosyncrasies of expression: how strongly it expresses (one gain per
   facial feature) and a resting offset (a habitual half-smile, frown, raised
   brows, sleepy eyes). Each draws its own class distribution,
   0.8 * Dirichlet(1) + 0.2 * uniform over the 7 FER2013 classes, so people differ
   in how often they show each emotion, as real clients of a federation do.
2. Expressions. An image's label is drawn from its person's distribution. Each
   class is a target vector of feature parameters (mouth curve, opening, width and
   asymmetry; brow height, tilt and arch; eye opening; nose wrinkle; brow furrow).
   The image moves from neutral toward that target by a random intensity times the
   person's gains, plus the person's offsets and per-image noise, so weak
   expressions blur into neutral and fear/surprise, angry/disgust overlap, as in FER.
3. Rendering. Features are painted with anti-aliased masks into a canonical,
   upright face frame, then one bilinear warp applies the pose (translation, small
   rotation, scale), followed by an illumination gradient, a brightness/contrast
   change, occluders (grey rectangles or skin-toned hand blobs) on a share of the
   images, and Gaussian noise.

Everything is vectorized over chunks of images and drawn from one
`numpy.random.Generator`, so a seed gives byte-identical arrays.
"""

from __future__ import annotations

import numpy as np

from fedssl.config.schema import DataConfig
from fedssl.data.dataset import FER2013_CLASSES, ImageDataset, SourceData
from fedssl.errors import UserError

# The dataset is one fixed dataset, not a function of the run seed: runs with
# different seeds then differ only in partition, sampling and training.
DATASET_SEED = 2026

_CHUNK = 128  # images rendered together: small enough for the arrays to stay in cache
_OCCLUDED_SHARE = 0.15

# A person's attributes that the renderer reads. Lengths are in the canonical face
# frame: x and y in [-1, 1] across the image, y pointing down.
_LOOK = ("face_a", "face_b", "skin", "hair_style", "hair", "hairline", "eye_x", "eye_y", "eye_w",
         "brow_gap", "brow_t", "mouth_y", "mouth_w", "lip_t", "bg", "glasses", "beard")

# Expression parameters, one row per class in FER2013_CLASSES order:
# mouth curve (+ smile), mouth open, mouth width (x), mouth asymmetry,
# brow raise, brow tilt (+ inner ends down: V), brow arch, eye opening (x),
# nose wrinkle, brow furrow.
_PARAMS = ("curve", "open", "width", "asym", "raise", "tilt", "arch", "eye", "wrinkle", "furrow")
_NEUTRAL = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
_TARGETS = np.array([
    [-0.035, 0.00, 0.85, 0.00, -0.05, 0.40, 0.00, 0.75, 0.2, 1.0],  # angry
    [-0.045, 0.03, 0.90, 0.05, -0.03, 0.25, 0.00, 0.65, 1.0, 0.4],  # disgust
    [-0.025, 0.07, 1.15, 0.00, 0.07, -0.30, 0.02, 1.40, 0.0, 0.3],  # fear
    [0.110, 0.07, 1.25, 0.00, 0.01, 0.00, 0.01, 0.75, 0.0, 0.0],  # happy
    [-0.075, 0.00, 0.90, 0.00, 0.00, -0.35, 0.00, 0.85, 0.0, 0.0],  # sad
    [0.000, 0.20, 0.62, 0.00, 0.11, -0.05, 0.06, 1.50, 0.0, 0.0],  # surprise
    _NEUTRAL,  # neutral
])
# Spread of a person's resting offsets (habitual half-smile, raised brows, ...) and
# of each image's jitter around its expression, per parameter.
_RESTING_SD = np.array([0.02, 0.01, 0.06, 0.0, 0.015, 0.1, 0.01, 0.1, 0.0, 0.0])
_JITTER_SD = np.array([0.015, 0.01, 0.05, 0.01, 0.012, 0.08, 0.01, 0.08, 0.1, 0.1])


def _validate(num_samples: int, num_identities: int, image_size: int, channels: int) -> None:
    """Raise UserError naming the recipe key of the first bad value."""
    if num_samples < 1:
        raise UserError(f"data.num_samples: must be >= 1, got {num_samples}")
    if not 1 <= num_identities <= num_samples:
        raise UserError(
            f"data.num_identities: must be >= 1 and <= data.num_samples ({num_samples}), got {num_identities}"
        )
    if image_size < 24:
        raise UserError(f"data.image_size: synthetic faces need at least 24 pixels, got {image_size}")
    if channels not in (1, 3):
        raise UserError(f"data.channels: must be 1 or 3, got {channels}")


def _draw_people(rng: np.random.Generator, k: int) -> dict[str, np.ndarray]:
    """Fixed attributes of k identities: look, expressiveness and class distribution."""
    u = lambda lo, hi, size=k: rng.uniform(lo, hi, size)  # noqa: E731
    people = {
        "face_a": u(0.50, 0.64), "face_b": u(0.70, 0.84), "skin": u(0.45, 0.85),
        "hair_style": rng.integers(0, 3, k), "hair": u(0.05, 0.45), "hairline": u(-0.52, -0.38),
        "eye_x": u(0.20, 0.28), "eye_y": u(-0.16, -0.06), "eye_w": u(0.085, 0.12),
        "brow_gap": u(0.11, 0.16), "brow_t": u(0.025, 0.045),
        "mouth_y": u(0.36, 0.46), "mouth_w": u(0.15, 0.22), "lip_t": u(0.018, 0.03),
        "bg": u(0.15, 0.85), "light_dir": u(0, 2 * np.pi), "light": u(0.0, 0.35),
        "glasses": rng.random(k) < 0.2, "beard": rng.random(k) < 0.15,
        "tint": np.ones((k, 3)), "bg_tint": rng.uniform(0.6, 1.0, (k, 3)),
        # Person-specific gain on each expression parameter and a resting offset:
        # a model tuned to one person's way of smiling helps on that person.
        "gain": np.exp(rng.normal(0.0, 0.3, (k, len(_PARAMS)))),
        "offset": rng.normal(0.0, 1.0, (k, len(_PARAMS))) * _RESTING_SD,
        "class_p": 0.8 * rng.dirichlet(np.ones(len(FER2013_CLASSES)), k) + 0.2 / len(FER2013_CLASSES),
    }
    # Skin (and hair, drawn in the same tint) is red >= green >= blue.
    people["tint"][:, 1] = rng.uniform(0.78, 0.95, k)
    people["tint"][:, 2] = people["tint"][:, 1] * rng.uniform(0.78, 0.95, k)
    return people


def _draw_expressions(rng: np.random.Generator, labels: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Per-image expression parameters (N, len(_PARAMS)) for the given labels."""
    intensity = rng.uniform(0.3, 1.0, (len(labels), 1))
    params = _NEUTRAL + intensity * gain * (_TARGETS[labels] - _NEUTRAL) + offset
    params += rng.normal(0.0, 1.0, params.shape) * _JITTER_SD
    params[:, 3] *= rng.choice([-1.0, 1.0], len(labels))  # disgust raises either corner
    params[:, 1] = np.maximum(params[:, 1], 0.0)
    return params


def _soft(signed_dist, px: float):
    """Anti-aliased coverage from a signed distance (negative inside), one pixel wide."""
    return np.clip(0.5 - signed_dist / px, 0.0, 1.0)


def _ellipse(u, v, cx, cy, a, b, px: float):
    """Coverage of the ellipse centred (cx, cy) with semi-axes (a, b)."""
    r = np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2)
    return _soft((r - 1.0) * np.minimum(a, b), px)


def _bar(u, v, cx, cy, half_len, half_t, slope, arch, px: float):
    """Coverage of a thick stroke centred (cx, cy): v offset = slope*x - arch*(1 - (x/half_len)^2)."""
    x = u - cx
    centre = cy + slope * x - arch * (1.0 - (x / half_len) ** 2)
    d = np.maximum(np.abs(v - centre) - half_t, np.abs(x) - half_len)
    return _soft(d, px)


def _paint(canvas, mask, value):
    """Composite `value` over `canvas` where `mask` covers it (in place)."""
    canvas += mask * (value - canvas)


def _render_canonical(
    p: dict[str, np.ndarray], size: int, with_background: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Upright faces (n, size, size) in [0, 1] and, if asked, the coverage of the background (for tinting)."""
    n, px = len(p["skin"]), 2.0 / size
    grid = ((np.arange(size) + 0.5) * px - 1.0).astype(np.float32)
    u, v = grid[None, None, :], grid[None, :, None]
    col = {k: val.reshape(n, 1, 1).astype(np.float32) for k, val in p.items()}

    canvas = np.broadcast_to(col["bg"], (n, size, size)).copy()
    long_hair = col["hair_style"] == 1
    hair = _ellipse(u, v, 0, np.where(long_hair, 0.05, -0.12), col["face_a"] + 0.09 + 0.06 * long_hair,
                    col["face_b"] * np.where(long_hair, 1.05, 0.8), px) * (col["hair_style"] != 2)
    _paint(canvas, hair, col["hair"])
    face = _ellipse(u, v, 0, 0.05, col["face_a"], col["face_b"], px)
    _paint(canvas, face, col["skin"])
    fringe = face * _soft(v - (col["hairline"] + 0.25 * u**2), px) * (col["hair_style"] != 2)
    _paint(canvas, fringe, col["hair"])
    # A beard follows the jaw: below the nose in the middle, higher at the sides.
    beard = face * _soft(col["mouth_y"] - 0.08 - 0.6 * u**2 - v, px) * col["beard"]
    _paint(canvas, beard, 0.35 * col["hair"] + 0.65 * col["skin"])

    # Eyes and brows only touch the upper-middle rows: restrict work to them.
    rows = slice(int(size * 0.15), int(size * 0.55))
    vr, sub = v[:, rows], canvas[:, rows]
    ey, ew = col["eye_y"], col["eye_w"]
    eh = np.maximum(ew * 0.5 * col["eye"], 0.012)
    brow_y = ey - col["brow_gap"] - col["raise"]
    for side in (-1.0, 1.0):
        ex = side * col["eye_x"]
        white = _ellipse(u, vr, ex, ey, ew, eh, px)
        _paint(sub, white, 0.92)
        _paint(sub, white * _ellipse(u, vr, ex, ey, 0.55 * ew, 0.55 * ew, px), 0.1)
        # Positive tilt lowers the inner ends (toward the nose): the angry V.
        brow = _bar(u, vr, ex, brow_y, 1.3 * ew, col["brow_t"], -side * 0.5 * col["tilt"], col["arch"], px)
        _paint(sub, brow, np.minimum(0.8 * col["hair"], 0.5 * col["skin"]))  # brows stay visible on dark skin
        glasses = col["glasses"] * (_ellipse(u, vr, ex, ey, 1.6 * ew, 1.3 * ew, px)
                                    - _ellipse(u, vr, ex, ey, 1.6 * ew - 0.025, 1.3 * ew - 0.025, px))
        _paint(sub, glasses, 0.08)

    # Furrow: two short vertical creases between the brows (anger); wrinkle:
    # horizontal creases across the nose bridge (disgust).
    for side in (-1.0, 1.0):
        crease = _ellipse(u, vr, side * 0.035, ey - 0.07, 0.009, 0.05, px)
        _paint(sub, crease * np.clip(col["furrow"], 0, 1), 0.7 * col["skin"])
    for dy in (-0.03, 0.0):
        crease = _bar(u, vr, 0, ey + 0.06 + dy, 0.05, 0.007, 0, -0.01, px)
        _paint(sub, crease * np.clip(col["wrinkle"], 0, 1), 0.65 * col["skin"])

    rows = slice(int(size * 0.45), int(size * 0.9))
    vr, sub = v[:, rows], canvas[:, rows]
    for side in (-1.0, 1.0):
        nostril = _ellipse(u, vr, side * (0.05 + 0.015 * col["wrinkle"]), col["mouth_y"] - 0.17, 0.03, 0.018, px)
        _paint(sub, nostril, 0.55 * col["skin"])
    mw = col["mouth_w"] * col["width"]
    s = np.clip(u / mw, -1.0, 1.0)
    envelope = np.sqrt(np.clip(1.0 - (u / mw) ** 2, 0.0, 1.0))
    # Asymmetry raises the corner on the side of its sign (the disgust sneer).
    raised = np.abs(col["asym"]) * np.maximum(s * np.sign(col["asym"]), 0.0) ** 2
    centre = col["mouth_y"] - col["curve"] * (s**2 - 0.33) - raised
    dist = np.abs(vr - centre)
    half_open = 0.5 * col["open"] * envelope
    lips = _soft(np.maximum(dist - half_open - col["lip_t"] * envelope**0.3, np.abs(u) - mw), px)
    _paint(sub, lips, 0.6 * col["skin"])
    inside = _soft(np.maximum(dist - half_open, np.abs(u) - mw), px) * (col["open"] > 0.004)
    _paint(sub, inside, 0.12)
    # Smiles show the upper teeth: the clearest cue of happiness, as in real faces.
    teeth = inside * _soft(vr - (centre - 0.15 * col["open"] * envelope), px) * np.clip(col["curve"] / 0.05, 0, 1)
    _paint(sub, teeth, 0.9)
    return canvas, ((1.0 - hair) * (1.0 - face) if with_background else None)


def _warp(images: np.ndarray, dx, dy, angle, scale) -> np.ndarray:
    """Bilinearly resample (n, c, S, S) images under a per-image similarity transform."""
    n, c, size, _ = images.shape
    half = size / 2.0
    # Inverse map, in pixel units: where in the canonical face each output pixel
    # comes from. Per-image constants go into the small (n, 1, S) and (n, S, 1)
    # terms so that only their sum is full size.
    cos, sin = [(f(angle) / scale * half).astype(np.float32)[:, None, None] for f in (np.cos, np.sin)]
    grid = ((np.arange(size) + 0.5) / half - 1.0).astype(np.float32)
    dx, dy = (d.astype(np.float32)[:, None, None] for d in (dx, dy))
    x, y = grid[None, None, :] - dx, grid[None, :, None] - dy
    sx = np.clip((cos * x + (half - 0.5)) + sin * y, 0, size - 1.001)
    sy = np.clip((cos * y + (half - 0.5)) - sin * x, 0, size - 1.001)
    x0, y0 = sx.astype(np.intp), sy.astype(np.intp)  # floor: both are >= 0
    fx, fy = (sx - x0)[:, None], (sy - y0)[:, None]
    # Index the flattened chunk directly: one gather per corner for all channels.
    idx = (np.arange(n * c) * size * size).reshape(n, c, 1, 1) + (y0 * size + x0)[:, None]
    flat = images.ravel()
    corner = lambda offset: np.take(flat, idx + offset, mode="clip")  # noqa: E731
    top, bottom = corner(0), corner(size)
    top += (corner(1) - top) * fx
    bottom += (corner(size + 1) - bottom) * fx
    return top + (bottom - top) * fy


def _occlude(img: np.ndarray, o: dict[str, np.ndarray]) -> None:
    """Paint a rectangle or a hand blob of colour o["color"] (n, C) on (n, H, W, C) images, in place."""
    n, size = img.shape[:2]
    px = 2.0 / size
    grid = ((np.arange(size) + 0.5) * px - 1.0).astype(np.float32)
    u, v = grid[None, None, :], grid[None, :, None]
    c = {k: val.reshape(n, 1, 1).astype(np.float32) for k, val in o.items() if k != "color"}
    rect = _soft(np.maximum(np.abs(u - c["x"]) - c["w"], np.abs(v - c["y"]) - c["h"]), px)
    # A palm with three fingers pointing up.
    hand = _ellipse(u, v, c["x"], c["y"], c["w"], 0.8 * c["w"], px)
    for k in (-1.0, 0.0, 1.0):
        finger = _ellipse(u, v, c["x"] + k * 0.55 * c["w"], c["y"] - 0.9 * c["w"], 0.2 * c["w"], 0.6 * c["w"], px)
        hand = np.maximum(hand, finger)
    mask = np.where(c["hand"] > 0, hand, rect)[..., None]
    _paint(img, mask, o["color"][:, None, None, :].astype(np.float32))


def _labels_per_identity(rng: np.random.Generator, identities: np.ndarray, class_p: np.ndarray) -> np.ndarray:
    """Sample each image's label from its identity's class distribution."""
    cdf = np.cumsum(class_p, axis=1)[identities]
    draw = rng.random(len(identities))[:, None]
    return np.minimum((draw > cdf).sum(axis=1), class_p.shape[1] - 1).astype(np.int64)


def _draw_nuisance(rng: np.random.Generator, people: dict[str, np.ndarray], identities: np.ndarray) -> dict:
    """Per-image pose, illumination, occluder and noise parameters."""
    n = len(identities)
    skin_rgb = people["skin"][identities, None] * people["tint"][identities] * rng.uniform(0.9, 1.1, (n, 1))
    grey = np.repeat(rng.uniform(0.0, 1.0, (n, 1)), 3, axis=1)
    hand = rng.random(n) < 0.5
    return {
        "dx": rng.normal(0, 0.06, n), "dy": rng.normal(0, 0.06, n),
        "angle": rng.normal(0, 0.12, n), "scale": rng.uniform(0.85, 1.12, n),
        # People keep roughly their own lighting: a person-level nuisance a
        # personalized model can learn to discount.
        "light_dir": people["light_dir"][identities] + rng.normal(0, 0.4, n),
        "light": people["light"][identities] * rng.uniform(0.5, 1.5, n),
        "contrast": rng.uniform(0.75, 1.15, n), "brightness": rng.normal(0, 0.06, n),
        "occluded": rng.random(n) < _OCCLUDED_SHARE,
        "occluder": {"x": rng.uniform(-0.45, 0.45, n), "y": rng.uniform(-0.3, 0.6, n), "w": rng.uniform(0.15, 0.3, n),
                     "h": rng.uniform(0.1, 0.25, n), "hand": hand, "color": np.where(hand[:, None], skin_rgb, grey)},
        "noise": rng.uniform(0.01, 0.05, n),
        "tint": people["tint"][identities], "bg_tint": people["bg_tint"][identities],
    }


def _finish(warped: np.ndarray, nz: dict, rng: np.random.Generator, channels: int) -> np.ndarray:
    """Light, tint, occlude and add noise to warped (n, 1 or 2, S, S) faces; uint8 (n, S, S, channels)."""
    n, _, size, _ = warped.shape
    col = lambda a: a.astype(np.float32).reshape(n, 1, 1)  # noqa: E731
    grid = ((np.arange(size) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    # Work in 0..255 from here: contrast, brightness and the scale fold into one affine map.
    gain = 255.0 * nz["contrast"]
    offset = 255.0 * (0.5 - 0.5 * nz["contrast"] + nz["brightness"]) + 0.5
    lx, ly = 0.5 * nz["light"] * np.cos(nz["light_dir"]), 0.5 * nz["light"] * np.sin(nz["light_dir"])
    shading = col(gain * lx) * grid[None, None, :] + (col(gain * ly) * grid[None, :, None] + col(gain))
    img = warped[:, 0] * shading
    img += col(offset)
    img = img[..., None]
    if channels == 3:
        background = warped[:, 1, ..., None]
        tint = nz["tint"][:, None, None, :] + background * (nz["bg_tint"] - nz["tint"])[:, None, None, :]
        img = img * tint.astype(np.float32)
    hit = np.flatnonzero(nz["occluded"])
    if len(hit):
        sub = img[hit]
        occluder = {k: val[hit] for k, val in nz["occluder"].items()}
        occluder["color"] = 255.0 * occluder["color"][:, :channels]  # red of a skin tint is 1: channel 0 is grey
        _occlude(sub, occluder)
        img[hit] = sub
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= (255.0 * nz["noise"]).astype(np.float32)[:, None, None, None]
    img += noise
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def generate_synthetic_faces(
    num_samples: int, num_identities: int, seed: int, image_size: int = 48, channels: int = 1
) -> ImageDataset:
    """Draw `num_samples` face images of `num_identities` people (see the module docstring).

    Identities get num_samples // num_identities images each (the remainder goes
    one each to the first identities), in shuffled order.
    """
    _validate(num_samples, num_identities, image_size, channels)
    rng = np.random.default_rng(seed)
    people = _draw_people(rng, num_identities)
    counts = np.full(num_identities, num_samples // num_identities)
    counts[: num_samples % num_identities] += 1
    identities = rng.permutation(np.repeat(np.arange(num_identities), counts)).astype(np.int64)
    labels = _labels_per_identity(rng, identities, people["class_p"])
    expressions = _draw_expressions(rng, labels, people["gain"][identities], people["offset"][identities])
    looks = {k: people[k][identities] for k in _LOOK}
    looks.update({name: expressions[:, i] for i, name in enumerate(_PARAMS)})
    nuisance = _draw_nuisance(rng, people, identities)

    out = np.empty((num_samples, image_size, image_size, channels), dtype=np.uint8)
    for lo in range(0, num_samples, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, num_samples))
        canvas, background = _render_canonical({k: val[sl] for k, val in looks.items()}, image_size, channels == 3)
        layers = canvas[:, None] if channels == 1 else np.stack([canvas, background], axis=1)
        warped = _warp(layers, *(nuisance[k][sl] for k in ("dx", "dy", "angle", "scale")))
        chunk_nuisance = {k: (val[sl] if k != "occluder" else {j: w[sl] for j, w in val.items()})
                          for k, val in nuisance.items()}
        out[sl] = _finish(warped, chunk_nuisance, rng, channels)
    return ImageDataset(images=out, labels=labels, class_names=FER2013_CLASSES, identities=identities)


def load(cfg: DataConfig) -> SourceData:
    """The synthetic faces of `cfg`, drawn with the fixed DATASET_SEED; no test split."""
    train = generate_synthetic_faces(cfg.num_samples, cfg.num_identities, DATASET_SEED, cfg.image_size, cfg.channels)
    return SourceData(train=train, test=None)
