"""A synthetic captioned image world for the quality benchmark.

64x64 RGB images of one or two flat shapes (colour, size) at fixed places (the layout, below)
on a plain background,
with captions such as "a large red circle on a blue background". Everything is deterministic
from a seed. The base model learns BASE_SHAPES only; NOVEL_SHAPES (a bar: a wide 3:1 rectangle,
and a column: a tall one) never appear in its training captions and serve as the new concepts to
personalize with a trigger word. They are chosen to differ from the base shapes in their coarse
outline (the 8x8 latent sees a 3:1 aspect; it barely sees a star's points or a ring's hole).

The latent space is fixed by hand, not learned (see `encode`): the 8x8 latent of a 64x64
image is the 8x8 average of its colours, affinely scaled. It is exactly what the TAESD-shaped
encoder saved in the checkpoint computes (train_base.analytic_encoder), so VAEEncode in ComfyUI
and `encode` here agree.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
LATENT = SIZE // 8

BASE_SHAPES = ("circle", "square", "triangle")
NOVEL_SHAPES = ("bar", "column")
ALL_SHAPES = BASE_SHAPES + NOVEL_SHAPES

OBJECT_COLOURS = {
    "red": (220, 35, 35),
    "green": (35, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 210, 30),
}
BACKGROUNDS = {
    "white": (240, 240, 240),
    "gray": (125, 125, 125),
    "red": (220, 35, 35),
    "blue": (35, 70, 225),
}
# Bounding-box side in pixels (jittered by +-2). 24/42 before: a small circle and a small square
# then differed in 0.033 of the 8x8 latent (mean square; 0.065 at 28 px) and the base drew them alike.
SIZES = {"small": 28, "large": 48}

# Instances (DreamBooth-like subjects): a base shape in a base colour with a mark of another
# colour (a centre dot, a middle band) that the base world never shows.
DETAILS = {"dot": "dot", "band": "band"}       # detail name -> how it is drawn
DETAIL_COLOURS = {"dot": "green", "band": "yellow"}
DOT_RADIUS = 0.25        # of the object's side
BAND_HALF_HEIGHT = 0.17  # of the object's side

# Latent scaling: latent = LATENT_GAIN * (mean colour in [0, 1] - 0.5); the 4th channel is the
# luminance (redundant, but keeps every channel informative for the diffusion model).
LATENT_GAIN = 3.0
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cx: float = 0.5   # centre, as a fraction of the image side
    cy: float = 0.5
    detail: str = ""  # an instance's mark (DETAILS), never in the base world
    side: float = 0.0  # bounding side in px; 0: the size's own (SIZES, jittered). Editing sources
    #                    use an in-between side the base world never shows

    def words(self, names: Optional[dict] = None) -> str:
        name = (names or {}).get(self.shape, self.shape)
        return f"{self.size} {self.colour} {name}"


@dataclass(frozen=True)
class Scene:
    objects: Tuple[Obj, ...]
    background: str

    def caption(self, names: Optional[dict] = None) -> str:
        """names maps a shape to the word used for it (e.g. {"bar": "sks"} for a concept)."""
        objs = " and ".join("a " + o.words(names) for o in self.objects)
        return f"{objs} on a {self.background} background"


def _rng(*key) -> random.Random:
    h = hashlib.sha256(repr(key).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "bar":
        return [(cx - r, cy - r / 3), (cx + r, cy - r / 3), (cx + r, cy + r / 3), (cx - r, cy + r / 3)]
    if shape == "column":
        return [(cx - r / 3, cy - r), (cx + r / 3, cy - r), (cx + r / 3, cy + r), (cx - r / 3, cy + r)]
    raise ValueError(shape)


def render(scene: Scene, size: int = SIZE, supersample: int = 4) -> np.ndarray:
    """uint8 array (size, size, 3). Shapes are drawn at `supersample` x and box-filtered."""
    S = size * supersample
    img = Image.new("RGB", (S, S), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        side = _jittered_side(o)
        r = side / 2 * supersample
        cx, cy = o.cx * S, o.cy * S
        col = OBJECT_COLOURS[o.colour]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        else:
            d.polygon(_polygon(o.shape, cx, cy, r), fill=col)
        if o.detail:
            kind, dcol = DETAILS[o.detail], OBJECT_COLOURS[DETAIL_COLOURS[o.detail]]
            if kind == "dot":
                q = DOT_RADIUS * 2 * r
                d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=dcol)
            else:  # a horizontal band across the middle
                q = BAND_HALF_HEIGHT * 2 * r
                d.rectangle([cx - r, cy - q, cx + r, cy + q], fill=dcol)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def _jittered_side(o: Obj) -> float:
    if o.side:
        return o.side
    # deterministic per object: jitter from the position
    j = (hash_unit(o.shape, o.cx, o.cy) - 0.5) * 4
    return SIZES[o.size] + j


def hash_unit(*key) -> float:
    return _rng(*key).random()


def mask(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Boolean (size, size): pixels covered by any object (ground truth for the judges)."""
    img = render(scene, size)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    return np.abs(img.astype(np.float32) - bg).sum(-1) > 60


# --------------------------------------------------------------------------------------------
# Sampling scenes
# --------------------------------------------------------------------------------------------

# The layout. Objects sit at fixed places (one object: the centre; two: top-left and
# bottom-right), jittered by up to LAYOUT_JITTER of the image side. With random positions the
# base, trained from scratch in ~30 CPU minutes, never learned its shapes (judged shape 0.31 on
# held-out captions, 0.21 on its own training captions, chance 0.33): the noise-prediction
# target averages a shape over every place it could be, and the model drew colour blobs. The
# autoencoder and the judges still see objects anywhere (random_scene), so they stay general.
LAYOUT_JITTER = 1.0 / SIZE
EDGE_MARGIN = 1.5  # px kept free around an object's box (two small objects must fit anywhere)
PAIR_CENTRES = ((0.25, 0.25), (0.75, 0.75))


def _jitter(rng: random.Random, x: float) -> float:
    return x + rng.uniform(-LAYOUT_JITTER, LAYOUT_JITTER)


def place(rng: random.Random, size: str) -> Tuple[float, float]:
    """The centre (fractions) of a scene's only object: the image centre, jittered."""
    return _jitter(rng, 0.5), _jitter(rng, 0.5)


def place_two(rng: random.Random) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Centres of a two-object scene's objects (both small): top-left, then bottom-right."""
    return tuple((_jitter(rng, x), _jitter(rng, y)) for x, y in PAIR_CENTRES)


def place_anywhere(rng: random.Random, size: str, taken: Sequence[Tuple[float, float, float]] = (),
                   tries: int = 200) -> Optional[Tuple[float, float]]:
    """A random centre (fractions) that keeps the object inside the image and its bounding box off
    the others' (Chebyshev distance: squares must not touch at their corners); None if none found."""
    half = (SIZES[size] / 2 + EDGE_MARGIN) / SIZE
    for _ in range(tries):
        cx, cy = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
        if all(max(abs(cx - x), abs(cy - y)) > half + h + 0.02 for x, y, h in taken):
            return cx, cy
    return None


def place_two_anywhere(rng: random.Random) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Random centres of two small objects that do not touch (the first is re-drawn when it
    leaves no room for the second)."""
    h = (SIZES["small"] / 2 + EDGE_MARGIN) / SIZE
    while True:
        p1 = place_anywhere(rng, "small")
        p2 = place_anywhere(rng, "small", [(p1[0], p1[1], h)], tries=50)
        if p2 is not None:
            return p1, p2


def single_combos(shapes: Sequence[str] = BASE_SHAPES) -> List[Tuple[str, str, str, str]]:
    """All (shape, colour, size, background) with the object colour differing from the background."""
    return [(s, c, z, b) for s in shapes for c in OBJECT_COLOURS for z in SIZES for b in BACKGROUNDS if c != b]


def caption_split(seed: int = 0, held_out: int = 12):
    """(train, held_out) single-object combos; every attribute value stays in the train split."""
    combos = single_combos()
    rng = _rng("split", seed)
    for _ in range(1000):
        test = rng.sample(combos, held_out)
        train = [c for c in combos if c not in test]
        if all({c[i] for c in train} == {c[i] for c in combos} for i in range(4)):
            return train, test
    raise RuntimeError("no split keeps every attribute in training")


def scene_from_combo(combo, rng: random.Random) -> Scene:
    shape, colour, size, bg = combo
    cx, cy = place(rng, size)
    return Scene((Obj(shape, colour, size, cx, cy),), bg)


def two_object_combos(seed: int = 0, n: int = 150, shapes: Sequence[str] = BASE_SHAPES):
    """n fixed two-object caption combos (both small, different shape or colour)."""
    rng = _rng("pairs", seed)
    out = set()
    while len(out) < n:
        bg = rng.choice(list(BACKGROUNDS))
        cols = [c for c in OBJECT_COLOURS if c != bg]
        a = (rng.choice(shapes), rng.choice(cols))
        b = (rng.choice(shapes), rng.choice(cols))
        if a != b:
            out.add((a, b, bg))
    return sorted(out)


def scene_from_pair(pair, rng: random.Random) -> Scene:
    (s1, c1), (s2, c2), bg = pair
    p1, p2 = place_two(rng)
    return Scene((Obj(s1, c1, "small", *p1), Obj(s2, c2, "small", *p2)), bg)


class BaseWorld:
    """The base model's training distribution: single objects from the train split (75%) and
    fixed two-object captions (25%), random positions."""

    def __init__(self, seed: int = 0, pair_fraction: float = 0.25):
        self.train, self.held_out = caption_split(seed)
        self.pairs = two_object_combos(seed)
        self.pair_fraction = pair_fraction
        self.seed = seed

    def captions(self) -> List[str]:
        rng = random.Random(0)
        caps = [scene_from_combo(c, rng).caption() for c in self.train]
        caps += [scene_from_pair(p, rng).caption() for p in self.pairs]
        return caps

    def sample(self, index: int) -> Scene:
        rng = _rng("scene", self.seed, index)
        if rng.random() < self.pair_fraction:
            return scene_from_pair(rng.choice(self.pairs), rng)
        return scene_from_combo(rng.choice(self.train), rng)


def random_scene(rng: random.Random, shapes: Sequence[str] = ALL_SHAPES, two: float = 0.2) -> Scene:
    """Any scene of the world, objects anywhere (all shapes; the autoencoder's and the judges'
    training data)."""
    bg = rng.choice(list(BACKGROUNDS))
    cols = [c for c in OBJECT_COLOURS if c != bg]
    if rng.random() < two:
        p1, p2 = place_two_anywhere(rng)
        return Scene((Obj(rng.choice(shapes), rng.choice(cols), "small", *p1),
                      Obj(rng.choice(shapes), rng.choice(cols), "small", *p2)), bg)
    size = rng.choice(list(SIZES))
    return Scene((Obj(rng.choice(shapes), rng.choice(cols), size, *place_anywhere(rng, size)),), bg)


# --------------------------------------------------------------------------------------------
# The fixed latent space
# --------------------------------------------------------------------------------------------

def encode(images: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) uint8 -> (N, 4, 8, 8) float32 latents (model space of an SD15 checkpoint)."""
    x = images.astype(np.float32) / 255.0
    n = x.shape[0]
    m = x.reshape(n, LATENT, 8, LATENT, 8, 3).mean(axis=(2, 4))  # (N, 8, 8, 3)
    luma = (m * np.array(LUMA, dtype=np.float32)).sum(-1, keepdims=True)
    z = LATENT_GAIN * (np.concatenate([m, luma], -1) - 0.5)
    return z.transpose(0, 3, 1, 2).copy()
