"""Read the world's attributes back from pixels (DESIGN §9, §12).

`read_shot(frames)` recovers, from one shot's frames alone, what `FilmSpec.shot_attributes()`
states: the character's colour, pattern and shape, the room, the entry side, the glass state and
the framing. Every decision is a nearest-palette vote (the world's colours are known, so pixels
are classified with a tolerance that survives video coding and imperfect generations):

- colour: the character colour with the most pixels, a pixel counting for the colour whose shades
  (t x rgb, t in [SHADE_MIN, 1]: body, and body blended with its darker marks by a low-pass
  autoencoder) it is nearest to; pattern: the share of its darker mark colour (solid / dots /
  stripes / checks; stripes are constant along one diagonal);
- shape: the character's row-width profile (u = relative height) against the four outlines:
  square 1, circle sqrt(1 - (2u-1)^2), diamond 1 - |2u-1|, triangle u (apex up);
- room: the room whose wall / wallpaper / floor colours cover the most pixels;
- entry side: the character stands on its entry side of the table (left when it entered from the
  left); framing: close-up when the glass is taller than CLOSE_UP_GLASS of the frame or the
  character taller than CLOSE_UP_HEIGHT;
- glass: no water -> empty; water that rises during the shot -> filling; else full.

Pattern and shape are read only from frames where the character is resolved: at least RESOLVED of
its pixels lie within CRISP_TOL of the body or mark colour. A low-pass autoencoder (the tiny
config's DCT at 64x64) blends the marks into the body and the outline into the room; a reader that
guessed there would turn blur into identity changes, so it abstains (None) instead.
"""
from __future__ import annotations

import numpy as np

from holocine_jax.shots import shot_bounds
from holocine_jax.world.captions import ENTRY_SIDES, SHAPES
from holocine_jax.world.render import BOTTLE, GLASS_RIM, LIQUID, TABLE, mark_colour, room_colours
from holocine_jax.world.story import COLOURS, PATTERNS, ROOMS

COLOUR_TOL, MARK_TOL, SCENE_TOL = 40.0, 22.0, 14.0
SHADE_MIN = 0.7     # darkest shade of a character colour that still counts as that colour
RESOLVED, CRISP_TOL = 0.8, 12.0  # share of the character's pixels within CRISP_TOL of body / mark
CLOSE_UP_GLASS = 0.21    # glass height / frame height: wide <= 0.16, close-up >= 0.27
CLOSE_UP_HEIGHT = 0.62   # character height / frame height: wide <= 0.49, close-up >= 0.75
MIN_PIXELS = 6


def _near(frames, rgb, tol):
    """[..., H, W] pixels within `tol` (Euclidean RGB) of rgb."""
    d = frames.astype(np.float32) - np.asarray(rgb, np.float32)
    return np.einsum("...c,...c->...", d, d) <= tol * tol


def _shade_distance(frames, rgb):
    """[..., H, W] Euclidean distance of each pixel to the shades t * rgb, t in [SHADE_MIN, 1]."""
    c = np.asarray(rgb, np.float32)
    p = frames.astype(np.float32)
    t = np.clip(np.einsum("...c,c->...", p, c) / (c @ c), SHADE_MIN, 1.0)
    return np.linalg.norm(p - t[..., None] * c, axis=-1)


def _bbox(mask):
    """(top, bottom, left, right) inclusive of a [H, W] mask, or None when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return rows[0], rows[-1], cols[0], cols[-1]


def _shape_profile(mask, box, clipped: str = ""):
    """Relative width of each row of the character's box (holes such as eyes ignored).

    clipped "left" / "right": the frame cuts that side off; every outline is symmetric and as
    wide as it is tall, so the centre is half the height in from the other side.
    """
    top, bottom, left, right = box
    height = bottom - top + 1
    centre = {"left": right + 0.5 - height / 2, "right": left - 0.5 + height / 2}.get(clipped)
    widths = []
    for row in mask[top:bottom + 1]:
        cols = np.flatnonzero(row)
        if not cols.size:
            widths.append(0.0)
        elif centre is None:
            widths.append(cols[-1] - cols[0] + 1.0)
        else:
            edge = cols[-1] + 0.5 if clipped == "left" else cols[0] - 0.5
            widths.append(2 * abs(edge - centre))
    widths = np.asarray(widths, np.float32)
    u = (np.arange(height) + 0.5) / height
    return u, np.clip(widths / max(widths.max(), 1.0), 0, 1)


OUTLINES = {
    "square": lambda u: np.ones_like(u),
    "circle": lambda u: np.sqrt(np.clip(1 - (2 * u - 1) ** 2, 0, 1)),
    "diamond": lambda u: 1 - np.abs(2 * u - 1),
    "triangle": lambda u: u,
}
assert set(OUTLINES) == set(SHAPES)


def _pattern(body, mark):
    """Pattern from the mark share and the diagonal structure inside the character."""
    char = body | mark
    share = mark.sum() / max(char.sum(), 1)
    if share < 0.04:
        return "solid"
    if share < 0.3:
        return "dots"

    def agreement(dx):  # how often (y, x) and (y + 1, x + dx) inside the character agree
        w = mark.shape[1]
        lo, hi = (slice(max(-dx, 0), w - max(dx, 0)), slice(max(dx, 0), w + min(dx, 0)))
        both = char[:-1, lo] & char[1:, hi]
        return ((mark[:-1, lo] == mark[1:, hi]) & both).sum() / max(both.sum(), 1)

    # stripes are constant along (down-left); checks are symmetric in the two diagonals
    return "stripes" if agreement(-1) - agreement(1) > 0.1 else "checks"


def read_shot(frames: np.ndarray) -> dict:
    """Attributes of one shot. frames: uint8 [n, H, W, 3]; None where nothing could be read."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    out = dict.fromkeys(("colour", "pattern", "shape", "room", "entry_side", "glass", "framing"))
    shade = np.stack([_shade_distance(frames, rgb) for rgb in COLOURS.values()])  # [C, n, H, W]
    nearest = shade.argmin(0)
    shaded = {name: (nearest == i) & (shade[i] <= COLOUR_TOL) for i, name in enumerate(COLOURS)}
    counts = {name: m.sum() for name, m in shaded.items()}
    room_votes = {name: sum(_near(frames, rgb, SCENE_TOL).sum() for rgb in room_colours(r))
                  for name, r in ROOMS.items()}
    out["room"] = max(room_votes, key=room_votes.get) if max(room_votes.values()) else None
    colour = max(counts, key=counts.get)
    if counts[colour] < MIN_PIXELS:
        return out
    out["colour"] = colour
    rgb = np.asarray(COLOURS[colour], np.float32)
    mark_rgb = mark_colour(colour)
    body, mark = _near(frames, rgb, COLOUR_TOL), _near(frames, mark_rgb, MARK_TOL)
    crisp = _near(frames, rgb, CRISP_TOL) | _near(frames, mark_rgb, CRISP_TOL)
    shape_votes, sides, heights, glasses, patterns, water, bottle = {}, [], [], [], [], [], 0
    for f in range(n):
        box = _bbox(body[f] | mark[f])
        if box is None:
            water.append(0)
            continue
        top, bottom, left, right = box
        inside = np.zeros((h, w), bool)
        inside[top:bottom + 1, left:right + 1] = True
        char = (body[f] | mark[f]) & inside
        heights.append((bottom - top + 1) / h)
        scene = frames[f]
        table = _near(scene, TABLE, SCENE_TOL) & ~inside
        if table.sum() >= MIN_PIXELS:
            sides.append("left" if np.flatnonzero(char.any(0)).mean() < np.nonzero(table)[1].mean()
                         else "right")
        water.append((_near(scene, LIQUID, COLOUR_TOL) & ~inside).sum())
        rim = _bbox(_near(scene, GLASS_RIM, SCENE_TOL) & ~inside)
        if rim is not None:
            glasses.append((rim[1] - rim[0] + 1) / h)
        bottle += (_near(scene, BOTTLE, MARK_TOL) & ~inside).sum() >= MIN_PIXELS
        blurred = shaded[colour][f] & inside
        resolved = (crisp[f] & inside).sum() >= RESOLVED * (char | blurred).sum()
        if char.sum() < 4 * MIN_PIXELS or not resolved:
            continue
        window = (slice(top, bottom + 1), slice(left, right + 1))
        patterns.append(_pattern(body[f][window] & ~mark[f][window], mark[f][window]))
        clipped = ("left" if left == 0 else "") + ("right" if right == w - 1 else "")
        if top > 0 and bottom < h - 1 and clipped in ("", "left", "right"):
            u, profile = _shape_profile(char, box, clipped)
            for name, outline in OUTLINES.items():
                shape_votes[name] = shape_votes.get(name, 0.0) + np.abs(profile - outline(u)).mean()
    if shape_votes:
        out["shape"] = min(shape_votes, key=shape_votes.get)
    if patterns:
        out["pattern"] = max(PATTERNS, key=patterns.count)
    if sides:
        out["entry_side"] = max(ENTRY_SIDES, key=sides.count)
    if glasses or heights:
        close = (glasses and np.median(glasses) >= CLOSE_UP_GLASS) or (
            heights and np.median(heights) >= CLOSE_UP_HEIGHT)
        out["framing"] = "close-up" if close else "wide"
    water = np.asarray(water, np.float32)
    floor = max(MIN_PIXELS, 1e-3 * h * w)
    if water.max() < floor:
        out["glass"] = "empty"
    elif bottle >= max(1, n // 4) or water[-1] > 1.5 * water[0] + floor:
        out["glass"] = "filling"
    else:
        out["glass"] = "full"
    return out


def read_film(frames: np.ndarray, cut_frames) -> list[dict]:
    """`read_shot` for every shot of a film cut at `cut_frames` (first frames of shots 2..K)."""
    return [read_shot(frames[a:b]) for a, b in shot_bounds(len(frames), cut_frames)]
