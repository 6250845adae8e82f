"""The synthetic toy-cinema world (DESIGN §9): multi-shot films with exact ground truth.

    spec = sample_film(3, num_frames=33)               # story: FilmSpec with captions and cuts
    frames = render_film(spec, height=64, width=64)    # uint8 [T, H, W, 3]
    shots = read_film(frames, spec.cut_frames)         # attributes read back, one dict per shot

captions.py: what captions say (templates, vocabulary, `caption_facts`); story.py: the film spec
and its sampling; render.py: pixels; reader.py: attributes from pixels.
"""
from holocine_jax.world.captions import (ACTION_GLASS, ACTIONS, ENTRY_SIDES, FRAMINGS,
                                         GLASS_STATES, SHAPES, caption_facts, caption_vocabulary,
                                         caption_words, global_caption, shot_caption)
from holocine_jax.world.reader import read_film, read_shot
from holocine_jax.world.render import BOTTLE, GLASS_RIM, LIQUID, TABLE, make_film, render_film
from holocine_jax.world.story import (CAMERAS, COLOURS, MAX_SHOTS, PATTERNS, ROOMS, FilmSpec,
                                      Shot, sample_cuts, sample_film)

__all__ = [
    "ACTIONS", "ACTION_GLASS", "BOTTLE", "CAMERAS", "COLOURS", "ENTRY_SIDES", "FRAMINGS",
    "FilmSpec", "GLASS_RIM", "GLASS_STATES", "LIQUID", "MAX_SHOTS", "PATTERNS", "ROOMS", "SHAPES",
    "Shot", "TABLE", "caption_facts", "caption_vocabulary", "caption_words", "global_caption",
    "make_film", "read_film", "read_shot", "render_film", "sample_cuts", "sample_film",
    "shot_caption",
]
