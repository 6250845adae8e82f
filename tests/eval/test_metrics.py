"""Metrics on constructed films whose answers are known."""
import numpy as np
import pytest

from holocine_jax import world
from holocine_jax.eval import metrics as M


def two_shot_film(num_frames=33, cut=17, size=32):
    """Shot 1 a red frame with a moving bar, shot 2 a blue one: the cut is at `cut`."""
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    frames[:cut] = (200, 40, 40)
    frames[cut:] = (40, 40, 200)
    for t in range(num_frames):
        frames[t, :, t % size] = 255
    return frames


def test_cut_detected_at_17():
    frames = two_shot_film()
    got = M.film_metrics(frames, [17]).compute()
    assert got["cut_precision"] == 1 and got["cut_recall"] == 1 and got["cut_exact"] == 1


@pytest.mark.parametrize("detected,requested,tol,want", [
    ([17], [17], 0, (1, 1, 1)),
    ([19], [17], 2, (1, 1, 1)),
    ([20], [17], 2, (0, 0, 0)),
    ([17, 30], [17], 2, (0.5, 1, 0)),
    ([], [9, 17], 2, (0, 0, 0)),
    ([9], [9, 17], 2, (1, 0.5, 0)),
    ([], [], 2, (1, 1, 1)),
    ([10], [9, 11], 2, (1, 0.5, 0)),  # one detection matches one request only
])
def test_cut_scores(detected, requested, tol, want):
    s = M.cut_scores(detected, requested, tol)
    assert (s["cut_precision"], s["cut_recall"], s["cut_exact"]) == pytest.approx(want)


def test_identical_shots_have_consistency_one():
    rng = np.random.default_rng(0)
    shot = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    film = np.concatenate([shot, shot, shot])
    intra, inter = M.consistency(film, [8, 16])
    assert inter == pytest.approx([1.0, 1.0, 1.0])
    static = np.repeat(shot[:1], 8, axis=0)
    intra, _ = M.consistency(np.concatenate([static, static]), [8])
    assert intra == pytest.approx([1.0, 1.0])
    # Opposite images (around grey) have cosine -1 under the built-in embedder.
    neg = 255 - static
    _, inter = M.consistency(np.concatenate([static, neg]), [8])
    assert inter[0] == pytest.approx(-1.0, abs=0.02)


def test_consistency_with_a_plugged_embedder():
    frames = two_shot_film()
    mean_colour = lambda f: f.reshape(len(f), -1, 3).mean(axis=1)  # noqa: E731
    _, inter = M.consistency(frames, [17], embed=mean_colour)
    red, blue = np.array([200, 40, 40.0]), np.array([40, 40, 200.0])
    red, blue = (c * 31 / 32 + 255 / 32 for c in (red, blue))  # one white column in 32
    want = red @ blue / np.linalg.norm(red) / np.linalg.norm(blue)
    assert inter[0] == pytest.approx(want, rel=1e-3)


def splice(spec_a, spec_b):
    """Shot 1 of film a, then the rest of film b (same cuts)."""
    a, b = world.render_film(spec_a), world.render_film(spec_b)
    cut = spec_a.cut_frames[0]
    return np.concatenate([a[:cut], b[cut:]])


def test_colour_swap_gives_identity_accuracy_zero():
    spec = world.sample_film(2, num_frames=33, num_shots=2)
    other = "green" if spec.colour != "green" else "red"
    swapped = world.FilmSpec.from_dict({**spec.to_dict(), "colour": other})
    truth = spec.shot_attributes()
    same = M.film_metrics(world.render_film(spec), spec.cut_frames, truth=truth,
                          captions=spec.shot_captions).compute()
    assert same["identity_consistency"] == 1 and same["room_consistency"] == 1
    assert same["text_alignment"] == 1 and same["glass_accuracy"] == 1
    got = M.film_metrics(splice(spec, swapped), spec.cut_frames, truth=truth).compute()
    assert got["identity_consistency"] == 0 and got["room_consistency"] == 1
    room = "office" if spec.room != "office" else "studio"
    moved = world.FilmSpec.from_dict({**spec.to_dict(), "room": room})
    got = M.film_metrics(splice(spec, moved), spec.cut_frames, truth=truth).compute()
    assert got["identity_consistency"] == 1 and got["room_consistency"] == 0


def test_text_alignment_catches_wrong_framing():
    spec = world.sample_film(0, num_frames=33)
    frames = world.render_film(spec)
    first = spec.shots[0]
    shot = frames[first.start:first.end]
    assert M.world_text_alignment(shot, first.caption) == 1.0
    wrong = first.caption.replace("Wide shot", "Close-up")
    assert M.world_text_alignment(shot, wrong) == pytest.approx(3 / 4)  # framing wrong of 4 facts
    assert np.isnan(M.world_text_alignment(shot, "a caption from another world"))


def test_merge_and_missing_values():
    a = M.FilmMetrics.from_values({"cut_recall": [1.0], "glass_accuracy": [1, 0, 1]})
    b = M.FilmMetrics.from_values({"cut_recall": [0.0], "glass_accuracy": [1]})
    got = M.to_floats(a.merge(b).compute())
    assert got["cut_recall"] == 0.5 and got["glass_accuracy"] == 0.75
    assert got["text_alignment"] is None
    with pytest.raises(KeyError, match="unknown metrics"):
        M.FilmMetrics.from_values({"fid": [1.0]})
    with pytest.raises(ValueError, match="captions"):
        M.film_metrics(two_shot_film(), [17], captions=["only one"])
