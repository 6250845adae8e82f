"""The world's captions: they never name colour, pattern or room; `caption_facts` inverts them."""
import re

from holocine_jax import world

SEEDS = range(60)


def test_captions_never_name_colour_pattern_or_room():
    forbidden = (set(world.COLOURS) | set(world.PATTERNS) | set(world.ROOMS)
                 | {"stripe", "striped", "dotted"})
    vocab = set(world.caption_vocabulary())
    assert not vocab & forbidden
    for seed in SEEDS:
        spec = world.sample_film(seed, num_frames=33)
        for text in (spec.global_caption,) + spec.shot_captions:
            words = set(re.findall(r"[\w-]+", text.lower()))
            assert not words & forbidden, text
            assert words <= vocab, text
        for shot in spec.shots:
            assert shot.caption.startswith({"wide": "Wide shot:", "close-up": "Close-up:"}[shot.framing])
        assert spec.shots[0].action == "enter" and spec.shots[0].framing == "wide"
        assert f"from the {spec.entry_side}" in spec.shots[0].caption


def test_caption_facts_read_back_what_the_spec_says():
    for seed in SEEDS:
        spec = world.sample_film(seed, num_frames=33)
        for k, (shot, truth) in enumerate(zip(spec.shots, spec.shot_attributes())):
            want = {key: truth[key] for key in ("framing", "shape", "glass")}
            if k == 0:
                want["entry_side"] = spec.entry_side
            assert world.caption_facts(shot.caption) == want, shot.caption
    assert world.caption_facts(spec.global_caption) == {}
    assert world.caption_facts("a caption from another world") == {}
