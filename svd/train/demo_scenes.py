"""Draws street-like scenes for the demo data: a road in perspective, facades or trees, cars, signs,
and for roadwork scenes large work-zone gear (cone tapers, striped barricades, water-filled
barriers, mesh fences, site hoardings, works vehicles, temporary yellow markings, diamond signs,
chevron boards), in varied places, sizes, colours and light.

The roadwork is drawn at the scale of the image on purpose. With random backbone weights (tests and
the demo) only large, colourful, image-wide differences survive the validator's crops and
distortions; small drawn cones gave a linear probe an MCC near 0 (design.md, "Learning on a random
backbone"). The base scene is drawn the same way for both classes, hard negatives included (orange
cars, red signs, a red bus), so the label is carried by the roadwork alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]

WHITE = (245, 245, 240)
BLACK = (20, 20, 22)
SKIES: tuple[tuple[Colour, Colour], ...] = (
    ((70, 130, 210), (190, 215, 240)),  # clear
    ((120, 125, 135), (190, 190, 195)),  # overcast
    ((150, 160, 175), (220, 222, 225)),  # haze
    ((60, 70, 120), (220, 175, 160)),  # dusk (a warm sky is a hard negative in itself)
)
SKY_ODDS = (0.4, 0.3, 0.2, 0.1)
SKY_BANDS = 48
FACADES: tuple[Colour, ...] = ((200, 190, 170), (150, 150, 155), (150, 100, 90), (225, 225, 215), (120, 105, 95))
CAR_COLOURS: tuple[Colour, ...] = ((235, 235, 235), (30, 30, 35), (160, 165, 170), (40, 70, 150), (170, 30, 30))
HARD_CAR_COLOURS: tuple[Colour, ...] = ((240, 120, 20), (245, 200, 30))
# Length of the road's bottom edge in "metres": sizes below are metres at depth t.
ROAD_METRES = 7.0


@dataclass(frozen=True)
class Frame:
    """The scene's perspective: depth t runs from 0 (horizon) to 1 (bottom edge); lateral u from
    -1 (left road edge) to 1 (right road edge), beyond for the verges."""

    width: int
    height: int
    horizon: float
    vanish_x: float
    left: float
    right: float

    def at(self, t: float, u: float) -> tuple[float, float]:
        mid = (self.left + self.right) / 2
        x = self.vanish_x + t * (mid - self.vanish_x) + u * t * (self.right - self.left) / 2
        return x, self.horizon + t * (self.height - self.horizon)

    def unit(self, t: float) -> float:
        """Pixels per metre at depth t."""
        return t * (self.right - self.left) / ROAD_METRES


def _jitter(rng: np.random.Generator, colour: Colour, amount: int) -> Colour:
    c = np.clip(np.asarray(colour) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


def _orange(rng: np.random.Generator) -> Colour:
    """Work-zone orange, from red-orange to amber."""
    return int(rng.integers(235, 256)), int(rng.integers(70, 160)), int(rng.integers(0, 40))


def new_frame(rng: np.random.Generator, width: int, height: int) -> Frame:
    horizon = height * rng.uniform(0.36, 0.52)
    vanish_x = width * rng.uniform(0.38, 0.62)
    spread = width * rng.uniform(1.0, 1.5)
    centre = width * rng.uniform(0.4, 0.6)
    return Frame(width, height, horizon, vanish_x, centre - spread / 2, centre + spread / 2)


def draw_background(rng: np.random.Generator, f: Frame) -> Image.Image:
    """Sky gradient, ground, facades or trees on both sides, road with markings."""
    top, low = (np.asarray(_jitter(rng, c, 15), dtype=np.float64) for c in SKIES[int(rng.choice(4, p=SKY_ODDS))])
    ground = _jitter(rng, (110, 115, 100) if rng.random() < 0.5 else (150, 145, 135), 20)
    im = Image.new("RGB", (f.width, f.height), ground)
    draw = ImageDraw.Draw(im)
    edges = np.linspace(0.0, f.horizon, SKY_BANDS + 1)
    for k in range(SKY_BANDS):  # a banded gradient: one rectangle per band is far cheaper than per-pixel maths
        c = top + (low - top) * k / (SKY_BANDS - 1)
        draw.rectangle((0, edges[k], f.width, edges[k + 1]), fill=(int(c[0]), int(c[1]), int(c[2])))
    for side in (-1, 1):
        if rng.random() < 0.75:
            _facades(rng, draw, f, side)
        else:
            _trees(rng, draw, f, side)
    _road(rng, draw, f)
    return im


def _facades(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame, side: int) -> None:
    u = side * rng.uniform(1.6, 2.4)
    t = 0.08
    while t < 1.05:
        t_next = t * rng.uniform(1.35, 1.9)
        height_m = rng.uniform(6, 18)
        (x0, y0), (x1, y1) = f.at(t, u), f.at(t_next, u)
        top0, top1 = y0 - height_m * f.unit(t), y1 - height_m * f.unit(t_next)
        colour = _jitter(rng, FACADES[int(rng.integers(len(FACADES)))], 18)
        edge = 0.0 if side < 0 else f.width
        draw.polygon([(x0, y0), (x1, y1), (x1, top1), (x0, top0)], fill=colour)
        draw.polygon([(x1, y1), (x1, top1), (edge, top1), (edge, y1)], fill=colour)
        dark = _jitter(rng, (60, 70, 80), 15)
        for k in range(1, 4):  # window rows along the facade
            a, b = k / 4 * height_m, (k / 4 + 0.08) * height_m
            draw.polygon(
                [(x0, y0 - a * f.unit(t)), (x1, y1 - a * f.unit(t_next)), (x1, y1 - b * f.unit(t_next)),
                 (x0, y0 - b * f.unit(t))],
                fill=dark,
            )  # fmt: skip
        t = t_next


def _trees(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame, side: int) -> None:
    for t in np.geomspace(0.1, 1.0, int(rng.integers(4, 9))):
        x, y = f.at(float(t), side * rng.uniform(1.4, 2.2))
        r = rng.uniform(2.0, 4.0) * f.unit(float(t))
        draw.rectangle((x - 0.1 * r, y - 1.2 * r, x + 0.1 * r, y), fill=(80, 60, 40))
        draw.ellipse((x - r, y - 2.6 * r, x + r, y - 0.8 * r), fill=_jitter(rng, (60, 110, 50), 25))


def _road(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> None:
    kerb = _jitter(rng, (170, 165, 160), 15)
    draw.polygon([f.at(0, -1.35), f.at(0, 1.35), f.at(1, 1.35), f.at(1, -1.35)], fill=kerb)
    asphalt = _jitter(rng, (85, 85, 90), 20)
    draw.polygon([f.at(0, -1), f.at(0, 1), f.at(1, 1), f.at(1, -1)], fill=asphalt)
    paint = (235, 235, 225) if rng.random() < 0.8 else (225, 190, 60)
    for u in (-0.95, 0.95):
        _strip(draw, f, u, 0.0, 1.0, 0.12, paint)
    for lane in [0.0] if rng.random() < 0.6 else [-1 / 3, 1 / 3]:
        t = 0.05
        while t < 1.0:
            _strip(draw, f, lane, t, min(1.0, t * 1.25), 0.12, (235, 235, 225))
            t *= 1.55


def _strip(draw: ImageDraw.ImageDraw, f: Frame, u: float, t0: float, t1: float, width_m: float, fill: Colour) -> None:
    du0 = width_m / 2 / ROAD_METRES * 2
    draw.polygon([f.at(t0, u - du0), f.at(t0, u + du0), f.at(t1, u + du0), f.at(t1, u - du0)], fill=fill)


def draw_car(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame, t: float, u: float, body: Colour) -> None:
    x, y = f.at(t, u)
    m = f.unit(t)
    w, h = rng.uniform(1.7, 2.0) * m, rng.uniform(1.3, 1.6) * m
    draw.rectangle((x - w / 2, y - 0.55 * h, x + w / 2, y - 0.1 * h), fill=body)
    draw.polygon([(x - 0.4 * w, y - 0.55 * h), (x - 0.3 * w, y - h), (x + 0.3 * w, y - h), (x + 0.4 * w, y - 0.55 * h)],
                 fill=body)  # fmt: skip
    draw.polygon([(x - 0.33 * w, y - 0.58 * h), (x - 0.26 * w, y - 0.93 * h), (x + 0.26 * w, y - 0.93 * h),
                  (x + 0.33 * w, y - 0.58 * h)], fill=(50, 60, 70))  # fmt: skip
    for dx in (-0.38, 0.38):
        draw.rectangle((x + (dx - 0.08) * w, y - 0.15 * h, x + (dx + 0.08) * w, y), fill=BLACK)


def draw_bus(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame, t: float, u: float) -> None:
    x, y = f.at(t, u)
    m = f.unit(t)
    w, h = 2.5 * m, 3.2 * m
    body = (200, 30, 30) if rng.random() < 0.6 else (230, 190, 30)
    draw.rectangle((x - w / 2, y - h, x + w / 2, y - 0.1 * h), fill=body)
    draw.rectangle((x - 0.45 * w, y - 0.9 * h, x + 0.45 * w, y - 0.55 * h), fill=(50, 60, 70))
    draw.rectangle((x - 0.45 * w, y - 0.15 * h, x + 0.45 * w, y), fill=BLACK)


def draw_sign(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame, t: float, u: float) -> None:
    """A street sign on a pole: red-rim round, red octagon (stop) or blue square."""
    x, y = f.at(t, u)
    m = f.unit(t)
    r, top = 0.35 * m, y - 2.4 * m
    draw.rectangle((x - 0.04 * m, top, x + 0.04 * m, y), fill=(120, 120, 125))
    kind = int(rng.integers(3))
    if kind == 0:
        draw.ellipse((x - r, top - r, x + r, top + r), fill=(200, 20, 30))
        draw.ellipse((x - 0.75 * r, top - 0.75 * r, x + 0.75 * r, top + 0.75 * r), fill=WHITE)
    elif kind == 1:
        draw.regular_polygon((x, top, r), 8, rotation=22.5, fill=(200, 20, 30))
    else:
        draw.rectangle((x - r, top - r, x + r, top + r), fill=(30, 80, 170))


def draw_street_life(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> list[str]:
    """Cars, signs and now and then a hard negative; returns the hard negatives drawn."""
    hard: list[str] = []
    cars = sorted((float(rng.uniform(0.15, 0.8)), float(rng.uniform(-0.7, 0.7))) for _ in range(rng.integers(0, 5)))
    for t, u in cars:
        draw_car(rng, draw, f, t, u, _jitter(rng, CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))], 20))
    for t in sorted(rng.uniform(0.2, 0.9, int(rng.integers(0, 3)))):
        draw_sign(rng, draw, f, float(t), float(rng.choice([-1.2, 1.2])))
    roll = rng.random()
    if roll < 0.2:
        taxi = int(roll >= 0.12)
        draw_car(rng, draw, f, rng.uniform(0.4, 0.9), rng.uniform(-0.6, 0.6), _jitter(rng, HARD_CAR_COLOURS[taxi], 12))
        hard.append(("orange car", "yellow taxi")[taxi])
    elif roll < 0.3:
        for t in (0.55, 0.8):
            draw_sign(rng, draw, f, t, float(rng.choice([-1.15, 1.15])))
        hard.append("red signs")
    elif roll < 0.36:
        draw_bus(rng, draw, f, rng.uniform(0.35, 0.7), rng.uniform(-0.5, 0.5))
        hard.append("bus")
    return hard


Drawer = Callable[[np.random.Generator, ImageDraw.ImageDraw, Frame], str]


def cone(draw: ImageDraw.ImageDraw, x: float, y: float, h: float, body: Colour) -> None:
    w = 0.55 * h
    draw.rectangle((x - 0.45 * h, y - 0.08 * h, x + 0.45 * h, y), fill=BLACK)
    draw.polygon([(x - w / 2, y - 0.08 * h), (x - 0.07 * h, y - h), (x + 0.07 * h, y - h), (x + w / 2, y - 0.08 * h)],
                 fill=body)  # fmt: skip
    for a, b in ((0.3, 0.42), (0.58, 0.68)):
        wa, wb = w / 2 * (1 - a) + 0.07 * h * a, w / 2 * (1 - b) + 0.07 * h * b
        draw.polygon([(x - wa, y - a * h), (x - wb, y - b * h), (x + wb, y - b * h), (x + wa, y - a * h)], fill=WHITE)


def cone_taper(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """A line of cones closing a lane, from near the camera towards the vanishing point."""
    side = float(rng.choice([-1, 1]))
    u_near, u_far = side * rng.uniform(0.0, 0.9), side * rng.uniform(0.0, 0.7)
    n = int(rng.integers(10, 20))
    body = _orange(rng)
    size = rng.uniform(1.0, 1.5)
    for k, t in enumerate(np.geomspace(0.2, rng.uniform(0.9, 1.05), n)):
        x, y = f.at(float(t), u_far + (u_near - u_far) * k / max(1, n - 1))
        cone(draw, x, y, size * f.unit(float(t)), body)
    return "traffic cones closing the {} lane".format("left" if side < 0 else "right")


def _striped_board(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], a: Colour, b: Colour) -> None:
    """Diagonal stripes of a on b; the stripes' ends are clamped into the box."""
    x0, y0, x1, y1 = box
    h = y1 - y0
    draw.rectangle(box, fill=b)
    x = x0 - h
    while x < x1:
        stripe = [(x, y1), (x + h, y0), (x + 1.6 * h, y0), (x + 0.6 * h, y1)]
        draw.polygon([(min(max(px, x0), x1), py) for px, py in stripe], fill=a)
        x += 1.2 * h


def barricade(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """A striped barricade across (part of) the road: two or three boards on legs."""
    t = rng.uniform(0.6, 1.0)
    u0 = rng.uniform(-1.2, -0.4)
    u1 = rng.uniform(max(u0 + 1.2, 0.4), 1.2)
    (x0, y), (x1, _) = f.at(t, u0), f.at(t, u1)
    m = f.unit(t)
    red = rng.random() < 0.25
    stripe = (210, 25, 25) if red else _orange(rng)
    boards = int(rng.integers(2, 4))
    for k in range(boards):
        top = y - (1.5 - 0.45 * k) * m
        _striped_board(draw, (x0, top, x1, top + 0.32 * m), stripe, WHITE)
    for x in (x0 + 0.1 * (x1 - x0), x1 - 0.1 * (x1 - x0)):
        draw.rectangle((x - 0.05 * m, y - 1.55 * m, x + 0.05 * m, y), fill=(230, 230, 230))
    return "a {} and white barricade across the road".format("red" if red else "orange")


def _band(draw: ImageDraw.ImageDraw, f: Frame, u: float, t: float, height_m: float, colours: Sequence[Colour]) -> None:
    """Panels of alternating colours standing along line u, from depth t to past the camera."""
    k = 0
    while t < 1.05:
        t1 = t * 1.2
        (x0, y0), (x1, y1) = f.at(t, u), f.at(t1, u)
        h0, h1 = height_m * f.unit(t), height_m * f.unit(t1)
        draw.polygon([(x0, y0), (x1, y1), (x1, y1 - h1), (x0, y0 - h0)], fill=colours[k % len(colours)])
        t, k = t1, k + 1


def water_barriers(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """A row of alternating water-filled barriers along a lane line."""
    a = _orange(rng) if rng.random() < 0.7 else (210, 30, 30)
    _band(draw, f, float(rng.choice([-1, 1])) * rng.uniform(0.1, 0.8), 0.15, 1.1, (a, WHITE))
    return "water-filled barriers along the lane"


def mesh_fence(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """An orange plastic mesh fence along one verge, from far away to past the camera."""
    side = float(rng.choice([-1, 1]))
    u = side * rng.uniform(0.5, 1.2)
    t0, t1 = rng.uniform(0.1, 0.25), rng.uniform(0.95, 1.1)
    height = rng.uniform(1.2, 1.8)
    colour = _orange(rng)
    lw = max(2, int(f.width / 250))
    ts = np.geomspace(t0, t1, 60)
    for t in ts:
        x, y = f.at(float(t), u)
        draw.line([(x, y), (x, y - height * f.unit(float(t)))], fill=colour, width=lw)
    (x0, y0), (x1, y1) = f.at(t0, u), f.at(t1, u)
    for k in range(13):
        h = height * k / 12
        draw.line([(x0, y0 - h * f.unit(t0)), (x1, y1 - h * f.unit(t1))], fill=colour, width=lw)
    return "an orange mesh fence along the {} side".format("left" if side < 0 else "right")


def hoarding(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """A tall site hoarding of striped panels in front of the facades on one side."""
    side = float(rng.choice([-1, 1]))
    colour = _orange(rng) if rng.random() < 0.75 else (210, 30, 30)
    _band(draw, f, side * rng.uniform(1.3, 1.6), rng.uniform(0.1, 0.2), rng.uniform(2.0, 2.8), (colour, WHITE))
    return "a striped site hoarding along the {} side".format("left" if side < 0 else "right")


def work_vehicle(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """A yellow excavator or an orange truck with a flashing arrow board, in the closed lane."""
    t = rng.uniform(0.35, 0.75)
    x, y = f.at(t, rng.uniform(-0.8, 0.8))
    m = f.unit(t)
    if rng.random() < 0.5:
        body = (int(rng.integers(220, 256)), int(rng.integers(170, 210)), 20)
        draw.rectangle((x - 1.8 * m, y - 0.6 * m, x + 1.8 * m, y), fill=BLACK)  # tracks
        draw.rectangle((x - 1.5 * m, y - 2.0 * m, x + 1.2 * m, y - 0.6 * m), fill=body)
        draw.rectangle((x - 1.3 * m, y - 3.0 * m, x - 0.1 * m, y - 2.0 * m), fill=body)
        draw.line([(x + 1.0 * m, y - 1.8 * m), (x + 2.6 * m, y - 3.4 * m), (x + 3.2 * m, y - 0.8 * m)],
                  fill=body, width=max(3, int(0.4 * m)))  # fmt: skip
        return "an excavator in the closed lane"
    body = _orange(rng)
    draw.rectangle((x - 1.3 * m, y - 2.6 * m, x + 1.3 * m, y - 0.2 * m), fill=body)
    draw.rectangle((x - 1.0 * m, y - 3.9 * m, x + 1.0 * m, y - 2.7 * m), fill=BLACK)
    for k in range(5):  # the arrow's lamps
        r = 0.1 * m
        cx, cy = x - 0.7 * m + k * 0.3 * m, y - 3.3 * m
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 190, 40))
    draw.rectangle((x - 1.2 * m, y - 0.3 * m, x + 1.2 * m, y), fill=BLACK)
    return "a works truck with an arrow board"


def yellow_lines(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """Temporary yellow lane markings shifting the traffic over."""
    colour = (int(rng.integers(225, 256)), int(rng.integers(185, 220)), int(rng.integers(0, 40)))
    shift = rng.uniform(-0.6, 0.6)
    for u in (-0.6 + shift, 0.6 + shift):
        _strip(draw, f, u, 0.05, 1.0, 0.3, colour)
    return "yellow temporary lane markings"


def diamond_sign(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """A large orange diamond 'road work ahead' sign on a stand at the roadside."""
    t = rng.uniform(0.55, 1.0)
    x, y = f.at(t, float(rng.choice([-1, 1])) * rng.uniform(0.7, 1.25))
    m = f.unit(t)
    r = rng.uniform(0.55, 0.8) * m
    cy = y - 1.0 * m - r
    draw.line([(x - 0.5 * r, y), (x, cy), (x + 0.5 * r, y)], fill=(90, 90, 95), width=max(2, int(0.06 * m)))
    draw.polygon([(x, cy - r), (x + r, cy), (x, cy + r), (x - r, cy)], fill=BLACK)
    draw.polygon([(x, cy - 0.9 * r), (x + 0.9 * r, cy), (x, cy + 0.9 * r), (x - 0.9 * r, cy)], fill=_orange(rng))
    s = 0.12 * r
    draw.ellipse((x - s, cy - 0.45 * r - s, x + s, cy - 0.45 * r + s), fill=BLACK)  # a worker with a shovel
    draw.line([(x, cy - 0.3 * r), (x - 0.1 * r, cy + 0.2 * r), (x - 0.3 * r, cy + 0.5 * r)], fill=BLACK, width=int(s))
    draw.line([(x + 0.35 * r, cy - 0.2 * r), (x + 0.1 * r, cy + 0.5 * r)], fill=BLACK, width=max(1, int(s / 2)))
    return "a road work ahead sign"


def chevron_board(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> str:
    """A wide chevron board (yellow on black, or red on white) in the lane or at the roadside."""
    t = rng.uniform(0.4, 0.95)
    x, y = f.at(t, rng.uniform(-1.1, 1.1))
    m = f.unit(t)
    w, h = rng.uniform(1.8, 3.0) * m, rng.uniform(0.5, 0.8) * m
    yellow = rng.random() < 0.5
    ground, mark = (BLACK, (250, 200, 20)) if yellow else (WHITE, (210, 25, 25))
    top = y - 0.6 * m - h
    draw.rectangle((x - w / 2, top, x + w / 2, top + h), fill=ground)
    step = h * 0.9
    cx = x - w / 2 + 0.2 * step
    while cx + step < x + w / 2:
        draw.polygon([(cx, top), (cx + 0.45 * step, top), (cx + 0.9 * step, top + h / 2), (cx + 0.45 * step, top + h),
                      (cx, top + h), (cx + 0.45 * step, top + h / 2)], fill=mark)  # fmt: skip
        cx += step
    draw.rectangle((x - 0.05 * m, top + h, x + 0.05 * m, y), fill=(90, 90, 95))
    return "a {} chevron board".format("yellow and black" if yellow else "red and white")


BIG_GEAR: tuple[Drawer, ...] = (cone_taper, barricade, water_barriers, mesh_fence, hoarding, work_vehicle)
SMALL_GEAR: tuple[Drawer, ...] = (diamond_sign, chevron_board, cone_taper, yellow_lines)


def draw_roadwork(rng: np.random.Generator, draw: ImageDraw.ImageDraw, f: Frame) -> list[str]:
    """Two to four big pieces of gear, plus one or two smaller ones; returns what was drawn."""
    picks = list(rng.choice(len(BIG_GEAR), size=int(rng.integers(2, 5)), replace=False))
    drawers = [BIG_GEAR[int(i)] for i in picks]
    drawers += [SMALL_GEAR[int(i)] for i in rng.choice(len(SMALL_GEAR), size=int(rng.integers(1, 3)))]
    return [d(rng, draw, f) for d in drawers]


def light(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    """Overall brightness and a colour cast, as a lookup table per channel."""
    gain = rng.uniform(0.6, 1.15) * (1 + rng.normal(0, 0.05, 3))
    lut = [int(min(255, max(0, v * g))) for g in gain for v in range(256)]
    return im.point(lut)


def render(
    rng: np.random.Generator, width: int, height: int, roadwork: bool
) -> tuple[Image.Image, list[str], list[str]]:
    """One scene: the image, the roadwork drawn (empty for none) and the hard negatives drawn."""
    f = new_frame(rng, width, height)
    im = draw_background(rng, f)
    draw = ImageDraw.Draw(im)
    hard = draw_street_life(rng, draw, f)
    gear = draw_roadwork(rng, draw, f) if roadwork else []
    return light(rng, im), gear, hard
