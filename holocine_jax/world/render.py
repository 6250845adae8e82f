"""Vectorised numpy renderer of the toy-cinema world (the story is in `story.py`).

    frames = render_film(spec, height=64, width=64)                  # uint8 [T, H, W, 3]
    frames, spec = make_film(3, height=64, width=64, num_frames=33)  # sample, then render

All frames of a film are drawn at once: per-frame parameters are [T] arrays, pixel coordinates
broadcast to [T, H, W], and each scene element is one boolean mask painted in order (wall, floor,
decoration, table, glass, liquid, character, bottle, stream). The scene lives in resolution-free
units (x, y in [0, 1] for the widest view, y down), so any height/width renders the same film;
rendering is a pure function of (spec, height, width).
"""
from __future__ import annotations

import numpy as np

from holocine_jax.world.story import CAMERAS, COLOURS, ROOMS, FilmSpec, sample_film

LIQUID = (70, 160, 255)
GLASS_RIM = (240, 244, 248)
TABLE = (112, 72, 40)
BOTTLE = (34, 60, 44)
EYE, PUPIL = (250, 250, 250), (20, 20, 20)
STRIPE_SHADE, BOARD_SHADE, MARK_SHADE = 0.86, 0.7, 0.5  # darker shades of wall, floor, body

FLOOR_Y = 0.70
RADIUS = 0.18                      # character half-size (~1.5 DiT tokens wide at 64x64, tiny)
CHAR_Y = 0.82 - RADIUS             # character centre when standing on the floor
TABLE_TOP = 0.60
GLASS_HALF_W, GLASS_TOP, GLASS_RIM_W = 0.035, 0.48, 0.008
LIQUID_TOP = TABLE_TOP - GLASS_RIM_W  # liquid surface at level 1 is GLASS_TOP + 0.02


def layout(side: str) -> tuple[float, float, float]:
    """(s, character rest x, glass x): s = +1 when the character enters from the left."""
    s = 1.0 if side == "left" else -1.0
    return s, 0.5 - s * 0.19, 0.5 + s * 0.12


def frame_params(spec: FilmSpec, aspect: float) -> dict[str, np.ndarray]:
    """Per-frame [T] float32 arrays: camera (cx, cy, hh), character (x, y), glass level,
    bottle tilt (radians) and visibility flags."""
    t = spec.num_frames
    s, rest_x, glass_x = layout(spec.entry_side)
    p = {k: np.zeros(t, np.float32) for k in
         ("cx", "cy", "hh", "char_x", "char_y", "level", "tilt", "bottle", "stream")}
    idle = 0.006 * np.sin(spec.phase + 2 * np.pi * np.arange(t) / 8.0)
    for shot in spec.shots:
        f = np.arange(shot.start, shot.end)
        frac = (f - shot.start) / max(shot.end - shot.start - 1, 1)
        cx, cy, hh = CAMERAS[shot.framing][shot.camera]
        if shot.framing == "close-up":
            cx = 0.5 * (rest_x + glass_x) + s * cx
        p["cx"][f], p["cy"][f], p["hh"][f] = cx, cy, hh
        p["char_x"][f], p["char_y"][f] = rest_x, CHAR_Y + idle[f]
        if shot.action == "enter":
            start_x = cx - s * (hh * aspect - RADIUS)  # just inside the entry edge: whole
            walk = np.clip(frac / 0.85, 0.0, 1.0)
            walk = walk * walk * (3 - 2 * walk)      # smoothstep
            p["char_x"][f] = start_x + (rest_x - start_x) * walk
            p["char_y"][f] = CHAR_Y - 0.02 * np.abs(np.sin(walk * 4 * np.pi))
        elif shot.action == "pour":
            p["level"][f] = np.clip((frac - 0.15) / 0.75, 0.0, 1.0)
            p["tilt"][f] = 0.6 + 0.6 * np.clip(frac / 0.2, 0.0, 1.0)
            p["bottle"][f] = 1.0
            p["stream"][f] = (frac > 0.12) & (frac < 0.92)
        elif shot.action == "rest":
            p["level"][f] = 1.0
    return p


# Palette slots of the label canvas (one uint8 label per pixel, mapped to RGB at the end).
(WALL, STRIPE, WALL_GLASS, STRIPE_GLASS, FLOOR, BOARD, FRAME, DECO, TABLE_L, LIQUID_L, RIM_L,
 BODY, MARK, EYE_L, PUPIL_L, BOTTLE_L) = range(16)


def room_colours(room: dict) -> tuple[np.ndarray, ...]:
    """float32 RGB [3] of a room's wall, wallpaper stripe, floor and floor boards."""
    wall = np.asarray(room["wall"], np.float32)
    floor = np.asarray(room["floor"], np.float32)
    return wall, wall * STRIPE_SHADE, floor, floor * BOARD_SHADE


def mark_colour(colour: str) -> np.ndarray:
    """uint8 RGB [3] of the pattern marks on a character of `colour` (a darker shade)."""
    return (np.asarray(COLOURS[colour], np.float32) * MARK_SHADE).astype(np.uint8)


def palette(spec: FilmSpec) -> np.ndarray:
    """[16, 3] uint8 RGB per label for the film's room and character."""
    room = ROOMS[spec.room]
    wall, stripe, floor, board = room_colours(room)
    rows = [wall, stripe, wall * 0.75 + 64, stripe * 0.75 + 64, floor, board, wall * 0.55,
            room["deco"], TABLE, LIQUID, GLASS_RIM, COLOURS[spec.colour], mark_colour(spec.colour),
            EYE, PUPIL, BOTTLE]
    return np.stack([np.asarray(r, np.float32) for r in rows]).astype(np.uint8)


def render_film(spec: FilmSpec, *, height: int = 64, width: int = 64) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of `spec` at height x width (any resolution >= 8x8)."""
    if height < 8 or width < 8:
        raise ValueError(f"resolution {height}x{width} too small (need >= 8x8)")
    aspect = width / height
    p = frame_params(spec, aspect)
    s, _, glass_x = layout(spec.entry_side)
    u = ((np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1)[None, None, :]
    v = ((np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1)[None, :, None]
    col = lambda a: a[:, None, None]  # noqa: E731  [T] -> [T, 1, 1]
    x = col(p["cx"]) + col(p["hh"]) * aspect * u   # [T, 1, W]
    y = col(p["cy"]) + col(p["hh"]) * v            # [T, H, 1]
    room = ROOMS[spec.room]
    paint = lambda mask, label: np.putmask(lab, np.broadcast_to(mask, lab.shape), label)  # noqa: E731

    # Wall with wallpaper stripes, floor with boards, the room's decoration (window/painting).
    lab = np.broadcast_to((np.floor(x / room["period"] * 2) % 2).astype(np.uint8),
                          (spec.num_frames, height, width)).copy()      # WALL or STRIPE
    floor = y >= FLOOR_Y
    paint(floor, FLOOR)
    paint(floor & (((y - FLOOR_Y) % 0.05) < 0.006), BOARD)
    x0, y0, x1, y1 = room["box"]
    paint((x >= x0 - 0.012) & (x <= x1 + 0.012) & (y >= y0 - 0.012) & (y <= y1 + 0.012), FRAME)
    paint((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1), DECO)

    # Table and glass: the interior (always over bare wall) is lightened, liquid up to the level.
    dx = np.abs(x - glass_x)
    paint((dx <= 0.13) & (y >= TABLE_TOP) & (y <= TABLE_TOP + 0.03), TABLE_L)
    paint((np.abs(dx - 0.11) <= 0.01) & (y > TABLE_TOP) & (y <= 0.80), TABLE_L)
    inside = (dx <= GLASS_HALF_W - GLASS_RIM_W) & (y >= GLASS_TOP) & (y < LIQUID_TOP)
    np.add(lab, WALL_GLASS - WALL, out=lab, where=np.broadcast_to(inside, lab.shape))
    surface = LIQUID_TOP - col(p["level"]) * (LIQUID_TOP - GLASS_TOP - 0.02)
    paint(inside & (y >= surface) & (col(p["level"]) > 0), LIQUID_L)
    paint((dx <= GLASS_HALF_W) & (y >= GLASS_TOP) & (y < TABLE_TOP) & ~inside, RIM_L)

    _paint_character(paint, spec, x, y, col(p["char_x"]), col(p["char_y"]), s)

    # Bottle above the glass, tilted towards the character's side; the stream of water.
    mouth_x, mouth_y = glass_x - s * 0.012, 0.42
    tilt = col(p["tilt"])
    ax, ay = -s * np.sin(tilt), -np.cos(tilt)          # unit axis from the mouth to the base
    along = (x - mouth_x) * ax + (y - mouth_y) * ay
    across = np.abs((x - mouth_x) * ay - (y - mouth_y) * ax)
    body = (along >= 0.04) & (along <= 0.16) & (across <= 0.028)
    neck = (along >= 0.0) & (along < 0.04) & (across <= 0.011)
    paint((body | neck) & (col(p["bottle"]) > 0), BOTTLE_L)
    stream = (np.abs(x - mouth_x) <= 0.006) & (y >= mouth_y) & (y < surface)
    paint(stream & (col(p["stream"]) > 0), LIQUID_L)
    return np.take(palette(spec), lab, axis=0)


def make_film(seed: int, *, height: int = 64, width: int = 64, num_frames: int = 33,
              **kwargs) -> tuple[np.ndarray, FilmSpec]:
    """(frames uint8 [T, H, W, 3], spec) for a seed; kwargs go to `sample_film`."""
    spec = sample_film(seed, num_frames=num_frames, **kwargs)
    return render_film(spec, height=height, width=width), spec


def _paint_character(paint, spec: FilmSpec, x, y, cx, cy, s: float) -> None:
    """Shape filled with colour and pattern, two eyes looking towards the glass."""
    lx, ly = (x - cx) / RADIUS, (y - cy) / RADIUS                      # [T, H, W] local coords
    if spec.shape == "circle":
        body = lx * lx + ly * ly <= 1.0
    elif spec.shape == "square":
        body = (np.abs(lx) <= 0.85) & (np.abs(ly) <= 0.85)
    elif spec.shape == "triangle":
        body = (ly <= 1.0) & (np.abs(lx) <= (ly + 1.0) * 0.5)
    elif spec.shape == "diamond":
        body = np.abs(lx) + np.abs(ly) <= 1.0
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    if spec.pattern == "solid":
        marks = np.zeros_like(body)
    elif spec.pattern == "stripes":
        marks = np.floor((lx + ly) * 2.5) % 2 == 1
    elif spec.pattern == "dots":
        marks = (lx * 2 % 1 - 0.5) ** 2 + (ly * 2 % 1 - 0.5) ** 2 <= 0.22 ** 2
    elif spec.pattern == "checks":
        marks = (np.floor(lx * 2) + np.floor(ly * 2)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {spec.pattern!r}")
    paint(body & ~marks, BODY)
    paint(body & marks, MARK)
    for ex in (-0.3, 0.3):
        paint((lx - ex) ** 2 + (ly - 0.1) ** 2 <= 0.18 ** 2, EYE_L)
        paint((lx - ex - s * 0.08) ** 2 + (ly - 0.1) ** 2 <= 0.09 ** 2, PUPIL_L)
