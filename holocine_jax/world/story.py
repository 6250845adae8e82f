"""The film spec of the toy-cinema world and its sampling (DESIGN §9).

A character (shape, colour, pattern) enters a room (wall/floor/decoration) from its entry side,
stops beside a table with an empty glass, pours water into it and stands beside the full glass.
Films have 2-5 shots; shot 1 is a wide shot of the entrance, later shots are wide or close-up.
The tables here hold what captions never name (colour, pattern, room) and the cameras; what they
do name lives in `captions.py`.

    spec = sample_film(seed=3, num_frames=33)   # FilmSpec: captions, cuts, attributes

Cuts follow Wan's latent geometry (`holocine_jax.shots`): shots start at pixel frames 4t+1 and are
at least `min_shot_latents` latent frames long. A spec is a pure function of the seed (numpy
Generator, no global RNG).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from holocine_jax.shots import latent_num_frames, latent_to_pixel_cut
from holocine_jax.world.captions import (ACTION_GLASS, ENTRY_SIDES, FRAMINGS, SHAPES,
                                         global_caption, shot_caption)

# Saturated character colours (RGB). Rooms use muted colours, so the palettes never collide.
COLOURS = {
    "red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (235, 215, 30),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (150, 50, 200),
}
PATTERNS = ("solid", "stripes", "dots", "checks")
# Room: wall, floor, decoration colour, decoration box (x0, y0, x1, y1) in scene units,
# wallpaper stripe period (scene units).
ROOMS = {
    "kitchen": dict(wall=(226, 214, 188), floor=(150, 110, 80), deco=(165, 205, 230),
                    box=(0.08, 0.12, 0.30, 0.40), period=0.10),
    "bedroom": dict(wall=(196, 178, 206), floor=(118, 92, 74), deco=(96, 64, 44),
                    box=(0.64, 0.10, 0.90, 0.34), period=0.16),
    "office": dict(wall=(172, 182, 186), floor=(82, 84, 96), deco=(236, 236, 228),
                   box=(0.20, 0.18, 0.48, 0.30), period=0.07),
    "studio": dict(wall=(186, 206, 172), floor=(204, 190, 166), deco=(120, 70, 90),
                   box=(0.70, 0.16, 0.86, 0.44), period=0.12),
}
MAX_SHOTS = 5
# Cameras (cx, cy, half_height) in scene units; close-up cx is an offset from the midpoint of
# character and glass, mirrored with the entry side. Scene: x, y in [0, 1] (y down), floor y > 0.7.
CAMERAS = {
    "wide": ((0.50, 0.50, 0.50), (0.41, 0.53, 0.43), (0.60, 0.56, 0.37)),
    "close-up": ((0.0, 0.62, 0.22), (0.05, 0.58, 0.17)),
}


@dataclasses.dataclass(frozen=True)
class Shot:
    """One shot: pixel frames [start, end), what happens, how it is framed, its caption.

    camera indexes `CAMERAS[framing]`; consecutive shots never share a camera.
    """
    start: int
    end: int
    action: str
    framing: str
    glass: str
    camera: int
    caption: str


@dataclasses.dataclass(frozen=True)
class FilmSpec:
    """Everything about a film except its pixels; `render_film` turns it into frames."""
    seed: int
    num_frames: int
    shape: str
    colour: str
    pattern: str
    room: str
    entry_side: str
    phase: float  # idle bobbing phase in [0, 2*pi)
    global_caption: str
    shots: tuple[Shot, ...]

    @property
    def num_shots(self) -> int:
        return len(self.shots)

    @property
    def cut_frames(self) -> tuple[int, ...]:
        """Pixel frames that start shots 2..K (each of the form 4t+1)."""
        return tuple(s.start for s in self.shots[1:])

    @property
    def shot_captions(self) -> tuple[str, ...]:
        return tuple(s.caption for s in self.shots)

    def shot_attributes(self) -> list[dict]:
        """Ground truth per shot: identity, room, entry side, glass state, framing, frames."""
        return [dict(shape=self.shape, colour=self.colour, pattern=self.pattern, room=self.room,
                     entry_side=self.entry_side, action=s.action, glass=s.glass,
                     framing=s.framing, start=s.start, end=s.end) for s in self.shots]

    def to_dict(self) -> dict:
        """JSON-able dict; `FilmSpec.from_dict` inverts it exactly."""
        d = dataclasses.asdict(self)
        d["shots"] = [dataclasses.asdict(s) for s in self.shots]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FilmSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(d)
        if missing:
            raise KeyError(f"FilmSpec dict is missing keys {sorted(missing)}")
        kw = {k: d[k] for k in fields}
        kw["shots"] = tuple(Shot(**s) for s in d["shots"])
        return cls(**kw)


def sample_cuts(rng: np.random.Generator, num_frames: int, num_shots: int,
                min_shot_latents: int = 2) -> tuple[int, ...]:
    """Random pixel cut frames (4t+1) for `num_shots` shots of >= min_shot_latents latent frames."""
    f = latent_num_frames(num_frames)
    extra = f - num_shots * min_shot_latents
    if extra < 0:
        raise ValueError(f"{num_frames} frames ({f} latent) cannot hold {num_shots} shots of "
                         f">= {min_shot_latents} latent frames")
    # Stars and bars: split `extra` spare latent frames among the shots uniformly.
    bars = np.sort(rng.choice(extra + num_shots - 1, size=num_shots - 1, replace=False))
    lengths = np.diff(np.concatenate([[-1], bars, [extra + num_shots - 1]])) - 1 + min_shot_latents
    latent_starts = np.cumsum(lengths)[:-1]
    return tuple(latent_to_pixel_cut(s) for s in latent_starts)


def _story(rng: np.random.Generator, num_shots: int) -> list[str]:
    """enter, look*a, pour, rest*b with a + b = num_shots - 2."""
    looks = int(rng.integers(0, num_shots - 1))
    return ["enter"] + ["look"] * looks + ["pour"] + ["rest"] * (num_shots - 2 - looks)


def sample_film(seed: int | np.random.Generator, *, num_frames: int = 33,
                num_shots: int | None = None, shot_range: tuple[int, int] = (2, MAX_SHOTS),
                min_shot_latents: int = 2) -> FilmSpec:
    """Sample a film's spec. `num_shots=None` draws from `shot_range` (inclusive), capped by
    what `num_frames` (4t+1) can hold with shots of at least `min_shot_latents` latent frames."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    seed_value = int(seed) if not isinstance(seed, np.random.Generator) else -1
    fit = latent_num_frames(num_frames) // min_shot_latents
    if num_shots is None:
        lo, hi = shot_range
        hi = min(hi, fit)
        if not 2 <= lo <= hi:
            raise ValueError(f"{num_frames} frames fit at most {fit} shots; shot_range={shot_range}")
        num_shots = int(rng.integers(lo, hi + 1))
    if not 2 <= num_shots <= fit:
        raise ValueError(f"num_shots={num_shots} must be in [2, {fit}] for {num_frames} frames")
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    room = list(ROOMS)[rng.integers(len(ROOMS))]
    side = ENTRY_SIDES[rng.integers(2)]
    phase = float(rng.uniform(0.0, 2 * np.pi))
    cuts = sample_cuts(rng, num_frames, num_shots, min_shot_latents)
    bounds = (0,) + cuts + (num_frames,)
    shots, prev = [], None
    for k, action in enumerate(_story(rng, num_shots)):
        framing = "wide" if k == 0 else FRAMINGS[rng.integers(2)]
        choices = [i for i in range(len(CAMERAS[framing])) if prev != (framing, i)]
        camera = 0 if k == 0 else int(choices[rng.integers(len(choices))])  # establishing shot
        prev = (framing, camera)
        shots.append(Shot(bounds[k], bounds[k + 1], action, framing, ACTION_GLASS[action],
                          camera, shot_caption(action, framing, shape, side)))
    return FilmSpec(seed=seed_value, num_frames=num_frames, shape=shape, colour=colour,
                    pattern=pattern, room=room, entry_side=side, phase=phase,
                    global_caption=global_caption(shape), shots=tuple(shots))
