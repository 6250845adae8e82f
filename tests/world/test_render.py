"""The world's renderer: determinism, ground truth seen in pixels, any resolution, visible cuts."""
import numpy as np

from holocine_jax import world
from holocine_jax.data.cuts import detect_cuts
from holocine_jax.world import GLASS_RIM, LIQUID

SEEDS = range(60)


def count(frames, rgb):
    """Pixels exactly equal to rgb per frame: [T]."""
    return np.all(frames == np.asarray(rgb, np.uint8), axis=-1).sum(axis=(-1, -2))


def test_same_seed_byte_identical_and_seeds_differ():
    a, spec_a = world.make_film(11, height=64, width=64, num_frames=33)
    b, spec_b = world.make_film(11, height=64, width=64, num_frames=33)
    assert a.dtype == np.uint8 and a.shape == (33, 64, 64, 3)
    assert a.tobytes() == b.tobytes() and spec_a == spec_b
    c, _ = world.make_film(12, height=64, width=64, num_frames=33)
    assert a.tobytes() != c.tobytes()
    # An explicit Generator gives the same film as the seed it was made from.
    spec_g = world.sample_film(np.random.default_rng(11), num_frames=33)
    assert spec_g.shots == spec_a.shots and spec_g.colour == spec_a.colour


def test_ground_truth_is_visible_in_pixels():
    for seed in SEEDS:
        frames, spec = world.make_film(seed, height=64, width=64, num_frames=33)
        colour = count(frames, world.COLOURS[spec.colour])
        others = sum(count(frames, rgb) for name, rgb in world.COLOURS.items() if name != spec.colour)
        assert colour.min() > 0 and others.max() == 0, seed
        darker = count(frames, (np.asarray(world.COLOURS[spec.colour]) * 0.5).astype(np.uint8))
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
        frames, spec = world.make_film(seed, height=64, width=64, num_frames=33)
        rgb = np.asarray(world.COLOURS[spec.colour], np.uint8)
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
    spec = world.sample_film(5, num_frames=17)
    small = world.render_film(spec, height=64, width=64).astype(np.float32)
    big = world.render_film(spec, height=256, width=256).astype(np.float32)
    pooled = big.reshape(17, 64, 4, 64, 4, 3).mean(axis=(2, 4))
    assert np.abs(pooled - small).mean() < 6.0
    other = world.render_film(world.sample_film(6, num_frames=17), height=64, width=64)
    assert np.abs(pooled - other).mean() > 3 * np.abs(pooled - small).mean()
    wide = world.render_film(spec, height=36, width=100)
    assert wide.shape == (17, 36, 100, 3)


def test_rendered_cuts_detected_at_stated_frames():
    for seed in SEEDS:
        frames, spec = world.make_film(seed, height=64, width=64, num_frames=33)
        assert detect_cuts(frames) == list(spec.cut_frames), seed
