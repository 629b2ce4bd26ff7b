"""Automatic judges for the synthetic world: what a 64x64 image shows, read from its pixels.

- background: median colour of the 3-pixel border, nearest background colour of the world;
- objects: connected components of the pixels far from that background colour (>= MIN_AREA px);
- colour of an object: median colour of its inner pixels, nearest object colour;
- size: side of its bounding box (small < SIZE_SPLIT px <= large);
- shape: a small MLP on the object's mask (cropped to its box, resized to 16x16), trained on
  ground-truth scenes of every shape and on their autoencoder reconstructions when a decoder is
  given (generated images look like reconstructions, not like crisp renders).
Each judge's accuracy on held-out ground truth is measured by `validate` and reported.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import scipy.ndimage as ndi

from bench import world

MIN_AREA = 25
SIZE_SPLIT = 38
MASK_THRESHOLD = 110  # sum of |RGB - background| per pixel
CROP = 16
JUDGE_VERSION = "4"
MARK_AGREEMENT = 0.6  # share of a mark/body region's pixels that must show its colour

_BG_NAMES = list(world.BACKGROUNDS)
_BG = np.array([world.BACKGROUNDS[k] for k in _BG_NAMES], dtype=np.float32)
_OBJ_NAMES = list(world.OBJECT_COLOURS)
_OBJ = np.array([world.OBJECT_COLOURS[k] for k in _OBJ_NAMES], dtype=np.float32)


@dataclass
class Seen:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    area: int


def _nearest(rgb, table, names):
    return names[int(np.argmin(np.abs(table - rgb).sum(-1)))]


def background(img: np.ndarray) -> str:
    px = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3), img[:, -3:].reshape(-1, 3)])
    return _nearest(np.median(px.astype(np.float32), 0), _BG, _BG_NAMES)


def object_masks(img: np.ndarray, bg_name: Optional[str] = None) -> List[np.ndarray]:
    """Masks of the objects, largest first (holes filled)."""
    bg = np.array(world.BACKGROUNDS[bg_name or background(img)], dtype=np.float32)
    fg = np.abs(img.astype(np.float32) - bg).sum(-1) > MASK_THRESHOLD
    lab, n = ndi.label(fg)
    masks = [lab == i for i in range(1, n + 1)]
    masks = [m for m in masks if m.sum() >= MIN_AREA]
    return sorted(masks, key=lambda m: -m.sum())


def soft_foreground(img: np.ndarray, bg_name: str) -> np.ndarray:
    """Per-pixel foreground degree in [0, 1]: distance from the background colour. Keeps the
    partial coverage of blurred edges that a threshold throws away."""
    bg = np.array(world.BACKGROUNDS[bg_name], dtype=np.float32)
    return np.clip(np.abs(img.astype(np.float32) - bg).sum(-1) / 250.0, 0, 1)


def object_features(img: np.ndarray, m: np.ndarray, bg_name: str) -> np.ndarray:
    """Shape features of one object: its soft foreground (other objects masked out) in its
    bounding square, CROP x CROP."""
    near = ndi.binary_dilation(m, iterations=3)
    return crop_features(m, soft_foreground(img, bg_name) * near)


def crop_features(m: np.ndarray, values: Optional[np.ndarray] = None) -> np.ndarray:
    """values (default: the mask) in the mask's bounding square, CROP x CROP, float in [0, 1]."""
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0) + 4  # a margin keeps blurred edges in view
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    canvas = np.zeros((side, side), np.float32)
    oy, ox = int(round(cy - side / 2)), int(round(cx - side / 2))
    src = m.astype(np.float32) if values is None else values.astype(np.float32)
    sub = src[max(oy, 0):oy + side, max(ox, 0):ox + side]
    canvas[max(-oy, 0):max(-oy, 0) + sub.shape[0], max(-ox, 0):max(-ox, 0) + sub.shape[1]] = sub
    zoom = CROP / side
    out = ndi.zoom(canvas, zoom, order=1)[:CROP, :CROP]
    if out.shape != (CROP, CROP):
        out = np.pad(out, ((0, CROP - out.shape[0]), (0, CROP - out.shape[1])))
    return out


def detail_colours(img: np.ndarray, m: np.ndarray, detail: str):
    """(body colour, mark colour) of one object: for a 'dot' the centre disk vs the outer ring of
    its mask, for a 'band' the middle rows vs the top and bottom rows (nearest object colours)."""
    ys, xs = np.nonzero(m)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    if world.DETAILS[detail] == "dot":
        dist = np.hypot(yy - cy, xx - cx) / side
        inner, outer = m & (dist < 0.12), m & (dist > 0.34)
    else:
        dist = np.abs(yy - cy) / side
        inner, outer = m & (dist < 0.08), m & (dist > 0.28)
    if inner.sum() < 1 or outer.sum() < 1:
        return None, None
    def med(sel):
        # the region's colour only when most of its own pixels agree (a chaotic object whose
        # middle rows merely average to the mark colour has no mark)
        px = img[sel].astype(np.float32)
        name = _nearest(np.median(px, 0), _OBJ, _OBJ_NAMES)
        each = np.abs(px[:, None, :] - _OBJ[None]).sum(-1).argmin(1)
        return name if np.mean(each == _OBJ_NAMES.index(name)) >= MARK_AGREEMENT else None
    return med(outer), med(inner)


class ShapeJudge:
    def __init__(self, net=None):
        self.net = net

    @staticmethod
    def make_net():
        import torch
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(CROP * CROP, 96), torch.nn.ReLU(),
                                   torch.nn.Linear(96, len(world.ALL_SHAPES)))

    def predict(self, feats: np.ndarray) -> List[str]:
        import torch
        with torch.no_grad():
            logits = self.net(torch.from_numpy(np.asarray(feats, np.float32)))
        return [world.ALL_SHAPES[i] for i in logits.argmax(1).tolist()]

    def fit(self, feats, labels, steps=600, seed=0):
        import torch
        torch.manual_seed(seed)
        self.net = self.make_net()
        X = torch.from_numpy(np.asarray(feats, np.float32))
        y = torch.tensor([world.ALL_SHAPES.index(l) for l in labels])
        opt = torch.optim.Adam(self.net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, len(X), (256,), generator=g)
                loss = torch.nn.functional.cross_entropy(self.net(X[idx]), y[idx])
                opt.zero_grad(); loss.backward(); opt.step()
        return self


def _scene_objects(scene, img):
    """Ground-truth objects matched to the image's components (by centre), for training/validation."""
    out = []
    for m in object_masks(img, scene.background):
        ys, xs = np.nonzero(m)
        cy, cx = ys.mean() / world.SIZE, xs.mean() / world.SIZE
        o = min(scene.objects, key=lambda o: (o.cx - cx) ** 2 + (o.cy - cy) ** 2)
        out.append((o, m))
    return out


def reconstruct(images: np.ndarray, decoder) -> np.ndarray:
    """images -> world.encode -> decoder -> uint8 images (what the model's VAE gives back)."""
    import torch
    with torch.no_grad():
        x = decoder(torch.from_numpy(world.encode(images)))
    return (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _dataset(n, seed, decoder=None):
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    imgs = np.stack([world.render(s) for s in scenes])
    sets = [imgs]
    if decoder is not None:
        sets.append(reconstruct(imgs, decoder))
    return scenes, sets


class Judges:
    """All judges together. `Judges.build(decoder)` trains the shape judge (seconds)."""

    def __init__(self, shape: ShapeJudge):
        self.shape = shape

    @classmethod
    def build(cls, decoder=None, n: int = 3000, seed: int = 1000):
        scenes, sets = _dataset(n, seed, decoder)
        feats, labels = [], []
        for imgs in sets:
            for s, img in zip(scenes, imgs):
                for o, m in _scene_objects(s, img):
                    feats.append(object_features(img, m, s.background)); labels.append(o.shape)
        return cls(ShapeJudge().fit(np.stack(feats), labels))

    def save(self, path):
        import os
        import torch
        tmp = Path(str(path) + ".tmp")  # through a temporary file: never a half-written cache
        torch.save({"version": JUDGE_VERSION, "state": self.shape.net.state_dict()}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        import torch
        d = torch.load(path, weights_only=True)
        if d.get("version") != JUDGE_VERSION:
            raise ValueError("stale judge file")
        net = ShapeJudge.make_net(); net.load_state_dict(d["state"])
        return cls(ShapeJudge(net))

    def objects(self, img: np.ndarray, bg: Optional[str] = None) -> List[Seen]:
        return [o for o, _ in self.objects_and_masks(img, bg)]

    def objects_and_masks(self, img: np.ndarray, bg: Optional[str] = None):
        bg = bg or background(img)
        masks = object_masks(img, bg)
        if not masks:
            return []
        shapes = self.shape.predict(np.stack([object_features(img, m, bg) for m in masks]))
        out = []
        for m, shape in zip(masks, shapes):
            inner = ndi.binary_erosion(m, iterations=2)
            px = img[inner if inner.sum() >= 4 else m].astype(np.float32)
            ys, xs = np.nonzero(m)
            side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
            out.append(Seen(shape, _nearest(np.median(px, 0), _OBJ, _OBJ_NAMES),
                            "small" if side < SIZE_SPLIT else "large",
                            xs.mean() / world.SIZE, ys.mean() / world.SIZE, int(m.sum())))
        return list(zip(out, masks))

    def instance(self, img: np.ndarray, shape: str, colour: str, detail: str) -> Dict[str, bool]:
        """Is the image's main object the instance (shape, body colour, detail)? Each part
        separately, and 'all'."""
        found = self.objects_and_masks(img)
        if not found:
            return {"shape": False, "colour": False, "detail": False, "all": False}
        o, m = found[0]
        body, mark = detail_colours(img, m, detail)
        r = {"shape": o.shape == shape, "colour": body == colour, "detail": mark == world.DETAIL_COLOURS[detail]}
        r["all"] = all(r.values())
        return r

    def has_instance(self, img: np.ndarray, shape: str, colour: str, detail: Optional[str] = None) -> bool:
        """Any object of the image is the instance (its detail too when `detail` is given)."""
        for o, m in self.objects_and_masks(img):
            if o.shape != shape:
                continue
            if detail is None:
                if o.colour == colour:
                    return True
            elif detail_colours(img, m, detail) == (colour, world.DETAIL_COLOURS[detail]):
                return True
        return False

    def both_present(self, img: np.ndarray, a, b) -> bool:
        """Two different objects (connected components) of the image, one each instance; a and b
        are (shape, colour) or (shape, colour, detail). A fused blob is one component, so it can
        never count as both (every merged grid of the earlier benchmark was one fused yellow/red blob)."""
        found = self.objects_and_masks(img)

        def fits(om, want):
            (o, m), (shape, colour, *detail) = om, want
            if o.shape != shape:
                return False
            if not detail:
                return o.colour == colour
            return detail_colours(img, m, detail[0]) == (colour, world.DETAIL_COLOURS[detail[0]])
        return any(i != k and fits(found[i], a) and fits(found[k], b)
                   for i in range(len(found)) for k in range(len(found)))

    def describe(self, img: np.ndarray) -> Dict:
        bg = background(img)
        return {"background": bg, "objects": self.objects(img, bg)}

    def validate(self, n: int = 400, seed: int = 2024, decoder=None) -> Dict[str, float]:
        """Accuracy of each judge on held-out ground truth (and on reconstructions with decoder):
        background, object count, and colour/size/shape of each matched object."""
        scenes, sets = _dataset(n, seed, decoder)
        report = {}
        for tag, imgs in zip(["gt", "recon"], sets):
            hits = {"background": [], "count": [], "colour": [], "size": [], "shape": []}
            for s, img in zip(scenes, imgs):
                d = self.describe(img)
                hits["background"].append(d["background"] == s.background)
                hits["count"].append(len(d["objects"]) == len(s.objects))
                for seen in d["objects"]:
                    o = min(s.objects, key=lambda o: (o.cx - seen.cx) ** 2 + (o.cy - seen.cy) ** 2)
                    hits["colour"].append(seen.colour == o.colour)
                    hits["size"].append(seen.size == o.size)
                    hits["shape"].append(seen.shape == o.shape)
                    hits.setdefault(f"shape_{o.size}", []).append(seen.shape == o.shape)
            for k, v in hits.items():
                report[f"{tag}_{k}"] = float(np.mean(v)) if v else float("nan")
        return report


def judges_for(decoder=None, cache: Optional[Path] = None, n: int = 3000) -> Judges:
    """Judges trained once and cached next to the base checkpoint."""
    if cache is not None and cache.is_file():
        try:
            return Judges.load(cache)
        except Exception:
            pass
    j = Judges.build(decoder, n=n)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        j.save(cache)
    return j
