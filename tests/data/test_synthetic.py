"""The synthetic world: determinism, Wan cut geometry, captions, and ground truth seen in pixels."""
import json
import re

import numpy as np
import pytest

from holocine_jax.data import synthetic as syn
from holocine_jax.data.cuts import detect_cuts
from holocine_jax.data.synthetic_render import GLASS_RIM, LIQUID

SEEDS = range(60)


def count(frames, rgb):
    """Pixels exactly equal to rgb per frame: [T]."""
    return np.all(frames == np.asarray(rgb, np.uint8), axis=-1).sum(axis=(-1, -2))


def test_same_seed_byte_identical_and_seeds_differ():
    a, spec_a = syn.make_film(11, height=64, width=64, num_frames=33)
    b, spec_b = syn.make_film(11, height=64, width=64, num_frames=33)
    assert a.dtype == np.uint8 and a.shape == (33, 64, 64, 3)
    assert a.tobytes() == b.tobytes() and spec_a == spec_b
    c, _ = syn.make_film(12, height=64, width=64, num_frames=33)
    assert a.tobytes() != c.tobytes()
    # An explicit Generator gives the same film as the seed it was made from.
    spec_g = syn.sample_film(np.random.default_rng(11), num_frames=33)
    assert spec_g.shots == spec_a.shots and spec_g.colour == spec_a.colour


@pytest.mark.parametrize("num_frames", [33, 81, 241])
def test_cuts_follow_wan_latent_geometry(num_frames):
    for seed in SEEDS:
        spec = syn.sample_film(seed, num_frames=num_frames)
        assert 2 <= spec.num_shots <= 5
        bounds = [s.start for s in spec.shots] + [num_frames]
        assert bounds[0] == 0 and all(a < b for a, b in zip(bounds, bounds[1:]))
        assert all(s.end == b for s, b in zip(spec.shots, bounds[1:]))
        for p in spec.cut_frames:
            assert p % 4 == 1, (seed, spec.cut_frames)
        # Latent shot lengths (DESIGN §3: cut p starts latent (p-1)//4+1) are >= 2 and sum to F.
        latent = [0] + [(p - 1) // 4 + 1 for p in spec.cut_frames] + [(num_frames - 1) // 4 + 1]
        assert min(np.diff(latent)) >= 2
    # Known values: 33 frames -> 9 latent frames; a cut at pixel 5 starts latent frame 2.
    assert syn.latent_frames(33) == 9 and syn.cut_to_latent(5) == 2 and syn.cut_to_latent(29) == 8


def test_shot_count_limits_and_errors():
    assert {syn.sample_film(s, num_frames=33, num_shots=4).num_shots for s in range(5)} == {4}
    seen = {syn.sample_film(s, num_frames=81).num_shots for s in range(200)}
    assert seen == {2, 3, 4, 5}
    with pytest.raises(ValueError, match="num_shots=5"):
        syn.sample_film(0, num_frames=33, num_shots=5)  # 9 latent frames hold at most 4 shots
    with pytest.raises(ValueError, match="resolution"):
        syn.render_film(syn.sample_film(0), height=4, width=64)


def test_captions_never_name_colour_pattern_or_room():
    forbidden = set(syn.COLOURS) | set(syn.PATTERNS) | set(syn.ROOMS) | {"stripe", "striped", "dotted"}
    vocab = set(syn.caption_vocabulary())
    assert not vocab & forbidden
    for seed in SEEDS:
        spec = syn.sample_film(seed, num_frames=33)
        for text in (spec.global_caption,) + spec.shot_captions:
            words = set(re.findall(r"[\w-]+", text.lower()))
            assert not words & forbidden, text
            assert words <= vocab, text
        for shot in spec.shots:
            assert shot.caption.startswith({"wide": "Wide shot:", "close-up": "Close-up:"}[shot.framing])
        assert spec.shots[0].action == "enter" and spec.shots[0].framing == "wide"
        assert f"from the {spec.entry_side}" in spec.shots[0].caption


def test_story_order_and_glass_states():
    for seed in SEEDS:
        spec = syn.sample_film(seed, num_frames=81)
        actions = [s.action for s in spec.shots]
        assert actions.count("pour") == 1 and actions[0] == "enter"
        k = actions.index("pour")
        assert set(actions[1:k]) <= {"look"} and set(actions[k + 1:]) <= {"rest"}
        assert [s.glass for s in spec.shots] == (["empty"] * k + ["filling"] + ["full"] * (len(actions) - k - 1))


def test_ground_truth_is_visible_in_pixels():
    for seed in SEEDS:
        frames, spec = syn.make_film(seed, height=64, width=64, num_frames=33)
        colour = count(frames, syn.COLOURS[spec.colour])
        others = sum(count(frames, rgb) for name, rgb in syn.COLOURS.items() if name != spec.colour)
        assert colour.min() > 0 and others.max() == 0, seed
        darker = count(frames, (np.asarray(syn.COLOURS[spec.colour]) * 0.5).astype(np.uint8))
        assert (darker.sum() > 0) == (spec.pattern != "solid"), (seed, spec.pattern)
        liquid = count(frames, LIQUID)
        for shot in spec.shots:
            seg = liquid[shot.start:shot.end]
            if shot.glass == "empty":
                assert seg.max() == 0, (seed, shot)
            elif shot.glass == "full":
                assert seg.min() > 0, (seed, shot)
            else:  # filling: starts empty, ends with water in the glass
                assert seg[0] == 0 and seg[-1] > 0, (seed, shot)


def test_entry_side_and_framing_in_pixels():
    for seed in SEEDS:
        frames, spec = syn.make_film(seed, height=64, width=64, num_frames=33)
        rgb = np.asarray(syn.COLOURS[spec.colour], np.uint8)
        if spec.pattern != "solid":
            body = np.all(frames == rgb, -1) | np.all(frames == (rgb * 0.5).astype(np.uint8), -1)
        else:
            body = np.all(frames == rgb, -1)
        first = spec.shots[0]
        x0 = np.nonzero(body[first.start])[1].mean()
        x1 = np.nonzero(body[first.end - 1])[1].mean()
        if spec.entry_side == "left":
            assert x0 < 16 and x1 > x0 + 4, (seed, x0, x1)
        else:
            assert x0 > 47 and x1 < x0 - 4, (seed, x0, x1)
        area = count(frames, GLASS_RIM)  # the glass looks bigger in close-ups
        wide = [area[s.start:s.end].mean() for s in spec.shots[1:] if s.framing == "wide"]
        close = [area[s.start:s.end].mean() for s in spec.shots if s.framing == "close-up"]
        if wide and close:
            assert min(close) > 2 * max(wide), (seed, wide, close)


def test_any_resolution_renders_the_same_scene():
    spec = syn.sample_film(5, num_frames=17)
    small = syn.render_film(spec, height=64, width=64).astype(np.float32)
    big = syn.render_film(spec, height=256, width=256).astype(np.float32)
    pooled = big.reshape(17, 64, 4, 64, 4, 3).mean(axis=(2, 4))
    assert np.abs(pooled - small).mean() < 6.0
    other = syn.render_film(syn.sample_film(6, num_frames=17), height=64, width=64)
    assert np.abs(pooled - other).mean() > 3 * np.abs(pooled - small).mean()
    wide = syn.render_film(spec, height=36, width=100)
    assert wide.shape == (17, 36, 100, 3)


def test_rendered_cuts_detected_at_stated_frames():
    for seed in SEEDS:
        frames, spec = syn.make_film(seed, height=64, width=64, num_frames=33)
        assert detect_cuts(frames) == list(spec.cut_frames), seed


def test_spec_round_trips_through_json():
    spec = syn.sample_film(3, num_frames=81)
    again = syn.FilmSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    attrs = spec.shot_attributes()
    assert len(attrs) == spec.num_shots and attrs[-1]["end"] == 81
    assert {a["colour"] for a in attrs} == {spec.colour} and attrs[0]["framing"] == "wide"
    with pytest.raises(KeyError, match="room"):
        syn.FilmSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "room"})
