"""The embedded data set: a procedural renderer of the six Intel scene classes.

Every image is drawn from its own seeded generator, ``default_rng([seed, class, index])``, so the set
is deterministic and image *i* of a class does not depend on how many images were asked for.

Design choices that keep the task learnable but not trivial:

* Colours are drawn per image *independently of the class* (random hue, saturation and value for sky,
  ground and objects), so mean colour alone cannot tell the classes apart; the class lives in geometry
  and texture.
* Deliberate look-alikes: mountains may carry snow caps and glaciers have ridges (glacier vs mountain);
  streets are lined with facades that have windows (street vs buildings); seas may show a distant
  island, and glaciers a strip of water (sea vs glacier).
* Random lighting gradients, brightness, pixel noise and occluding blobs on every class.

The images are written as PNG files in the ImageFolder layout so they go through exactly the same
loading code as real photographs.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("buildings", "forest", "glacier", "mountain", "sea", "street")
DEFAULT_PER_CLASS = 300
DEFAULT_SIZE = 64
RENDERER_VERSION = 1  # bump when the drawing changes, so stale caches are not reused


def _colour(rng: np.random.Generator, value: tuple[float, float] = (0.15, 0.95)) -> np.ndarray:
    hue = rng.uniform(0, 1)
    sat = rng.uniform(0.05, 0.8)
    val = rng.uniform(*value)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)


def _jitter(colour: np.ndarray, rng: np.random.Generator, amount: float = 0.12) -> np.ndarray:
    return np.clip(colour + rng.normal(0, amount, 3).astype(np.float32), 0, 1)


def _ridge(rng: np.random.Generator, x: np.ndarray, base: float, amplitude: float, roughness: float) -> np.ndarray:
    """A skyline height per column: a sum of random sines; more roughness = more, sharper peaks."""
    y = np.full_like(x, base)
    n_waves = int(3 + 6 * roughness)
    for k in range(1, n_waves + 1):
        freq = rng.uniform(0.5, 1.5) * k * (1 + 2 * roughness)
        y += amplitude / k**0.8 * np.sin(2 * np.pi * freq * x + rng.uniform(0, 2 * np.pi))
    if roughness > 0.5:  # jagged: add triangle peaks
        for _ in range(rng.integers(1, 4)):
            cx, width = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.35)
            y -= amplitude * 2.0 * np.clip(1 - np.abs(x - cx) / width, 0, None)
    return y


def _sky_and_ground(rng: np.random.Generator, yy: np.ndarray, horizon: float) -> np.ndarray:
    sky, ground = _colour(rng), _colour(rng)
    img = np.where((yy < horizon)[..., None], sky, ground).astype(np.float32)
    # a soft vertical gradient in the sky, as in real photographs
    img *= (1 - 0.25 * (1 - yy / max(horizon, 1e-3)).clip(0, 1) * rng.uniform(0, 1))[..., None]
    return img


def _windows(img: np.ndarray, rng: np.random.Generator, yy, xx, box: tuple[float, float, float, float],
             colour) -> None:
    """A grid of windows in ``box`` = (x0, x1, y0, y1), in image fractions."""
    x0, x1, y0, y1 = box
    period = rng.uniform(0.04, 0.09)
    fill = rng.uniform(0.35, 0.65)
    off_x, off_y = rng.uniform(0, period, 2)
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    win = (((xx - x0 + off_x) % period) < period * fill) & (((yy - y0 + off_y) % period) < period * fill)
    img[inside & win] = colour


def _draw_buildings(img, rng, yy, xx, size):
    x = 0.0
    while x < 1.0:
        width = rng.uniform(0.12, 0.35)
        top = rng.uniform(0.05, 0.55)
        facade = _colour(rng)
        mask = (xx >= x) & (xx < x + width) & (yy >= top)
        img[mask] = facade
        _windows(img, rng, yy, xx, (x + 0.02, x + width - 0.02, top + 0.03, 0.92), _jitter(1 - facade, rng, 0.2))
        x += width + rng.uniform(-0.03, 0.05)


def _draw_street(img, rng, yy, xx, size):
    vx, vy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.5)
    road = _colour(rng, (0.1, 0.6))
    half_bottom = rng.uniform(0.3, 0.6)
    t = ((yy - vy) / (1 - vy)).clip(0, None)
    on_road = (yy > vy) & (np.abs(xx - vx) < t * half_bottom)
    img[on_road] = road
    # dashed centre line shrinking towards the vanishing point
    dash = on_road & (np.abs(xx - vx) < 0.012 + 0.02 * t) & ((t * 8 + rng.uniform()) % 1 < 0.5)
    img[dash] = _jitter(1 - road, rng, 0.1)
    # facades on both sides, receding towards the vanishing point (the look-alike of buildings)
    for side in (-1, 1):
        if rng.uniform() < 0.8:
            facade = _colour(rng)
            edge = vx + side * (t * half_bottom + 0.02)
            height = vy - rng.uniform(0.1, 0.3) * (1 + t)
            spread = np.abs(xx - vx)
            mask = (side * (xx - edge) > 0) & (yy > height - spread * 0.6) & (yy < vy + spread * 1.2)
            img[mask] = facade
            x0, x1 = (0.0, vx - 0.1) if side < 0 else (vx + 0.1, 1.0)
            sub = img.copy()
            _windows(sub, rng, yy, xx, (x0, x1, 0.0, 1.0), _jitter(1 - facade, rng, 0.2))
            img[mask] = sub[mask]


def _draw_forest(img, rng, yy, xx, size):
    n_trees = rng.integers(8, 20)
    trunk = _colour(rng, (0.05, 0.45))
    for _ in range(n_trees):
        cx, width = rng.uniform(0, 1), rng.uniform(0.01, 0.035)
        top = rng.uniform(0.1, 0.6)
        img[(np.abs(xx - cx) < width) & (yy > top)] = _jitter(trunk, rng, 0.05)
    leaf = _colour(rng)
    for _ in range(rng.integers(25, 60)):
        cx, cy = rng.uniform(0, 1), rng.uniform(-0.05, 0.65)
        r = rng.uniform(0.04, 0.12)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = _jitter(leaf, rng, 0.1)
    # leafy high-frequency texture
    img += rng.normal(0, 0.08, img.shape[:2])[..., None].astype(np.float32) * (yy < 0.75)[..., None]


def _draw_mountain(img, rng, yy, xx, size):
    ridge = _ridge(rng, xx[0], rng.uniform(0.35, 0.55), rng.uniform(0.06, 0.12), rng.uniform(0.6, 1.0))
    below = yy > ridge[None, :]
    rock = _colour(rng, (0.1, 0.7))
    img[below] = rock
    # rocky texture: strong diagonal striations
    tex = np.sin((xx * rng.uniform(20, 40) + yy * rng.uniform(10, 30)) + rng.normal(0, 0.8, xx.shape))
    img += (0.1 * tex * below)[..., None].astype(np.float32)
    if rng.uniform() < 0.5:  # snow caps: the glacier look-alike
        depth = rng.uniform(0.04, 0.12)
        cap = below & (yy < ridge[None, :] + depth * (1 + 0.5 * np.sin(xx * 30)))
        img[cap] = _jitter(np.array([0.92, 0.94, 0.97], np.float32), rng, 0.05)


def _draw_glacier(img, rng, yy, xx, size):
    ridge = _ridge(rng, xx[0], rng.uniform(0.25, 0.5), rng.uniform(0.02, 0.07), rng.uniform(0.0, 0.6))
    below = yy > ridge[None, :]
    ice = _colour(rng, (0.55, 1.0)) * 0.4 + 0.6 * rng.uniform(0.6, 1.0)
    img[below] = ice
    # smooth, large-scale shading and a few dark crevasses
    img *= (1 - 0.2 * below * np.sin(xx * rng.uniform(3, 8) + rng.uniform(0, 6)))[..., None]
    for _ in range(rng.integers(2, 7)):
        x0, slope = rng.uniform(0, 1), rng.uniform(-1.5, 1.5)
        crack = below & (np.abs(xx - x0 - slope * (yy - 0.5)) < rng.uniform(0.004, 0.012))
        img[crack] = _colour(rng, (0.05, 0.4))
    if rng.uniform() < 0.35:  # a strip of meltwater in front: the sea look-alike
        img[yy > rng.uniform(0.8, 0.92)] = _colour(rng)


def _draw_sea(img, rng, yy, xx, size):
    horizon = rng.uniform(0.3, 0.6) + rng.uniform(-0.05, 0.05) * (xx - 0.5)
    water = _colour(rng)
    below = yy > horizon
    img[below] = water
    freq = rng.uniform(30, 70)
    waves = np.sin(yy * freq * (1 + 2 * (yy - horizon).clip(0, None)) + np.sin(xx * rng.uniform(8, 20)) * 1.5)
    img += (0.12 * waves * below)[..., None].astype(np.float32)
    if rng.uniform() < 0.3:  # a distant island or headland: the mountain look-alike
        cx, width = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.3)
        height = rng.uniform(0.03, 0.1)
        island = (np.abs(xx - cx) < width) & (yy < horizon) & (yy > horizon - height * (1 - np.abs(xx - cx) / width))
        img[island] = _colour(rng, (0.1, 0.6))


_DRAW = {
    "buildings": _draw_buildings,
    "forest": _draw_forest,
    "glacier": _draw_glacier,
    "mountain": _draw_mountain,
    "sea": _draw_sea,
    "street": _draw_street,
}


def render_scene(class_name: str, index: int, seed: int = 0, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render image ``index`` of ``class_name`` as an ``(size, size, 3)`` uint8 array."""
    class_idx = CLASSES.index(class_name)
    rng = np.random.default_rng([seed, class_idx, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = _sky_and_ground(rng, yy, rng.uniform(0.3, 0.6))
    _DRAW[class_name](img, rng, yy, xx, size)
    # occluders (birds, people, cars, leaves) on any class
    for _ in range(rng.integers(0, 4)):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.02, 0.08)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = _colour(rng)
    # lighting: a linear gradient in a random direction, overall brightness, sensor noise
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.5) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    img = img * light[..., None] * rng.uniform(0.7, 1.2)
    img += rng.normal(0, rng.uniform(0.01, 0.06), img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_synthetic_dataset(root: Path, per_class: int = DEFAULT_PER_CLASS, seed: int = 0,
                            size: int = DEFAULT_SIZE) -> Path:
    """Write the data set as ``root/<class>/<class>_<i>.png``; reuse it when already complete.

    Rendered into a private temporary folder that is renamed to ``root`` once complete (with its
    ``.complete`` marker): runs started together never read a PNG another run is still writing, and
    a crash leaves no half-written ``root``. The renderer is deterministic, so whichever run's folder
    wins, every run sees the same bytes.
    """
    root = Path(root)
    marker = root / ".complete"
    spec = {"per_class": per_class, "seed": seed, "size": size, "version": RENDERER_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    tmp = root.parent / f".tmp-{root.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for class_name in CLASSES:
            folder = tmp / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(render_scene(class_name, i, seed, size)).save(folder / f"{class_name}_{i:04d}.png")
        (tmp / ".complete").write_text(json.dumps(spec))
        if root.exists() and not marker.exists():
            shutil.rmtree(root, ignore_errors=True)  # left half-written by an older sceneml
        try:
            tmp.rename(root)
        except OSError:  # another run renamed its complete copy first: use that one
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
