"""Draws a session's frames with numpy: the place's background, the object each
action is about and the actor's hand, posed by how far into its clip a frame is.

Scene coordinates are the unit square centred in the frame (y down), so the
scene looks the same at any size and survives a resize + centre crop. The
object is large and every action moves something across the whole clip, so the
four frames sampled at the midpoints of a clip's quarters show the action even
at 32 px."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

from synth.world import Action, Session

RGB = {"red": (225, 35, 35), "green": (40, 185, 60), "blue": (40, 80, 230),
       "yellow": (245, 215, 35), "purple": (160, 55, 205)}
SKIN, SLEEVE, OUTLINE, DECAL = (238, 184, 146), (205, 205, 215), (25, 25, 25), (250, 250, 250)
WATER, BUBBLE, BRUSH = (150, 205, 255), (255, 255, 255), (120, 75, 40)

TABLE_Y = 0.8  # top of the table, where objects rest
RAISED_Y = 0.3  # where a lifted object's centre ends up
SIZE = 0.2  # object radius
HAND = 0.07  # hand radius
BUBBLES = 12


@dataclass(frozen=True)
class Look:
    """Per-clip nuisance, so that no two clips of one event look the same."""
    scale: float
    shift: float
    bubbles: np.ndarray  # [BUBBLES, 3]: angle, distance / radius, bubble radius

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Look:
        bubbles = np.stack([rng.uniform(0, 2 * np.pi, BUBBLES), rng.uniform(0.7, 1.3, BUBBLES),
                            rng.uniform(0.03, 0.055, BUBBLES)], axis=1)
        return cls(float(rng.uniform(0.9, 1.1)), float(rng.uniform(-0.04, 0.04)), bubbles)


def frames(session: Session, width: int, height: int, fps: int, clip_s: int) -> Iterator[np.ndarray]:
    canvas = Canvas(width, height)
    background = _background(session.place, width, height)
    per_clip = clip_s * fps
    total = round(session.duration_s * fps)
    for k, clip in enumerate(session.clips):
        look = Look.draw(np.random.default_rng([session.render_seed, k]))
        n = min(per_clip, total - k * per_clip)
        for j in range(n):
            frame = background.copy()
            draw_action(frame, canvas, clip.action, j / n, look)
            yield frame


def draw_action(frame: np.ndarray, canvas: Canvas, action: Action, progress: float, look: Look) -> None:
    """Draw `action` at `progress` in [0, 1) of its clip."""
    verb, p = action.verb, progress
    r = SIZE * look.scale
    x, y = 0.5 + look.shift, TABLE_Y - r
    angle, painted = 0.0, 0.0
    if verb in ("picks_up", "puts_down"):
        p = p if verb == "picks_up" else 1 - p  # putting down is picking up backwards
        reach, lift = min(p / 0.4, 1.0), max((p - 0.4) / 0.6, 0.0)
        y += (RAISED_Y - y) * lift
        hand = (x, 0.05 + (y - r - HAND - 0.05) * reach)
    elif verb in ("moves_left", "moves_right"):
        side = 1 if verb == "moves_left" else -1  # the hand pushes from behind
        x = 0.5 + side * (0.25 - 0.5 * p)
        hand = (x + side * (r + HAND), y)
    elif verb == "turns":
        angle = np.pi * p
        hand = (x, y - r - HAND - 0.04)
    elif verb == "paints":
        painted = p
        hand = (x, y - r + 2 * r * p - 0.25)
    elif verb == "washes":
        x += 0.02 * np.sin(6 * np.pi * p)
        hand = (x - r - HAND, y + 0.05 * np.sin(4 * np.pi * p))
    else:
        raise ValueError(f"cannot draw {verb!r}")

    new_colour = RGB[action.new_colour] if action.new_colour else None
    canvas.thing(frame, action.thing.shape, x, y, r, angle, RGB[action.thing.colour], new_colour, painted)
    if verb == "paints":  # a brush from the hand down to the paint line
        canvas.rect(frame, x - 0.012, hand[1], x + 0.012, hand[1] + 0.25, BRUSH)
        canvas.disc(frame, x, hand[1] + 0.25, 0.035, new_colour)
    if verb == "washes":  # a stream of water and a growing foam of bubbles
        canvas.rect(frame, x - 0.03, -1.0, x + 0.03, y - r, WATER)
        for a, d, b in look.bubbles[: 1 + int(p * BUBBLES)]:
            canvas.disc(frame, x + d * r * np.cos(a), y + d * r * np.sin(a), b, BUBBLE)
    canvas.rect(frame, hand[0] - 0.045, -1.0, hand[0] + 0.045, hand[1], SLEEVE)
    canvas.disc(frame, hand[0], hand[1], HAND, SKIN)


class Canvas:
    """Maps scene coordinates to the pixels of a width x height frame."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.unit = min(width, height)
        self.x0, self.y0 = (width - self.unit) / 2, (height - self.unit) / 2
        self.line = max(1.0, 0.012 * self.unit) / self.unit  # outline width, at least a pixel

    def window(self, x0: float, y0: float, x1: float, y1: float):
        """Pixel slices of a scene box and the scene coordinates of their pixel centres."""
        c0 = int(np.clip(np.floor(self.x0 + x0 * self.unit), 0, self.width))
        c1 = int(np.clip(np.ceil(self.x0 + x1 * self.unit), 0, self.width))
        r0 = int(np.clip(np.floor(self.y0 + y0 * self.unit), 0, self.height))
        r1 = int(np.clip(np.ceil(self.y0 + y1 * self.unit), 0, self.height))
        xs = (np.arange(c0, c1) + 0.5 - self.x0) / self.unit
        ys = (np.arange(r0, r1) + 0.5 - self.y0) / self.unit
        return (slice(r0, r1), slice(c0, c1)), xs[None, :], ys[:, None]

    def rect(self, frame, x0, y0, x1, y1, colour) -> None:
        region, _, _ = self.window(x0, y0, x1, y1)
        frame[region] = colour

    def disc(self, frame, x, y, r, colour) -> None:
        region, xs, ys = self.window(x - r, y - r, x + r, y + r)
        d2 = (xs - x) ** 2 + (ys - y) ** 2
        patch = frame[region]
        patch[d2 <= r * r] = OUTLINE
        patch[d2 <= (r - self.line) ** 2] = colour

    def thing(self, frame, shape, x, y, r, angle, colour, new_colour, painted) -> None:
        """An outlined shape with a white stripe (so turning shows), painted
        with `new_colour` from the top down to the fraction `painted`."""
        reach = 1.2 * r
        region, xs, ys = self.window(x - reach, y - reach, x + reach, y + reach)
        cos, sin = np.cos(angle), np.sin(angle)
        u = (xs - x) * cos + (ys - y) * sin
        v = (ys - y) * cos - (xs - x) * sin
        outer = _shape_mask(shape, u, v, r, 0.0)
        inner = _shape_mask(shape, u, v, r, self.line)
        patch = frame[region]
        patch[outer] = OUTLINE
        patch[inner] = colour
        if painted:
            patch[inner & (ys < y - r + 2 * r * painted)] = new_colour
        patch[inner & (np.abs(v) < 0.18 * r)] = DECAL


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float, inset: float) -> np.ndarray:
    if shape == "cube":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r - inset
    if shape == "ball":
        return u * u + v * v <= (r - inset) ** 2
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= (r - inset) ** 2) & (d2 >= (0.5 * r + inset) ** 2)
    if shape == "cone":  # a triangle, apex up; 1.15 turns the inset into a distance from the slanted sides
        return (v <= 0.75 * r - inset) & (np.abs(u) <= (v + r) / 1.75 - 1.15 * inset)
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=16)
def _background(place: str, width: int, height: int) -> np.ndarray:
    """A wall with the place's colour and texture above a table. Texture noise
    uses a fixed generator per place: places look the same in every corpus."""
    canvas = Canvas(width, height)
    _, xs, ys = canvas.window(-10, -10, 10, 10)
    xs, ys = np.broadcast_to(xs, (height, width)), np.broadcast_to(ys, (height, width))
    noise = np.random.default_rng(zlib.crc32(place.encode())).normal(0, 1, (height, width, 1))
    wall = np.empty((height, width, 3))
    if place == "kitchen":  # cream tiles
        grout = (np.mod(xs, 0.125) < 0.012) | (np.mod(ys, 0.125) < 0.012)
        wall[:] = np.where(grout[..., None], (195, 185, 165), (238, 228, 204))
        table = (196, 156, 108)
    elif place == "workshop":  # wooden planks
        plank = np.floor(ys / 0.1)
        wall[:] = np.where((np.mod(plank, 2) == 0)[..., None], (150, 100, 62), (132, 88, 54))
        wall[np.mod(ys, 0.1) < 0.01] = (80, 52, 32)
        table = (85, 88, 96)
    elif place == "garden":  # grass
        wall[:] = (92, 160, 72) + noise * (6, 22, 6)
        table = (125, 88, 58)
    elif place == "studio":  # dark backdrop under a spotlight
        light = 1 + 1.2 * np.exp(-((xs - 0.5) ** 2 + (ys - 0.35) ** 2) / 0.06)
        wall[:] = np.array((40, 46, 78)) * light[..., None]
        table = (32, 32, 38)
    elif place == "garage":  # concrete with a hazard stripe
        wall[:] = (150, 150, 146) + noise * 10
        band = (ys > 0.04) & (ys < 0.12)
        stripes = np.mod(xs + ys, 0.1) < 0.05
        wall[band & stripes] = (240, 200, 30)
        wall[band & ~stripes] = (30, 30, 30)
        table = (110, 120, 132)
    else:
        raise ValueError(f"unknown place {place!r}")
    wall[ys >= TABLE_Y] = table
    return np.clip(wall, 0, 255).astype(np.uint8)
