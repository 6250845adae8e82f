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


def test_sca_exact_cuts_is_one():
    assert M.shot_cut_accuracy([61, 121], [61, 121], 241) == 1.0
    assert M.shot_cut_accuracy([], [], 241) == 1.0


def test_sca_one_off_and_one_missed():
    # requested 40 and 80 in 120 frames; detected 43 only: deviation 3 + one missed cut.
    p = 16.0
    assert M.shot_cut_accuracy([43], [40, 80], 120, penalty=p) == pytest.approx(np.exp(-(3 + p) / 120))
    # an extra cut costs the same penalty; a far detection is cheaper unmatched (2p < 50).
    assert M.shot_cut_accuracy([40, 100], [40], 120, penalty=p) == pytest.approx(np.exp(-p / 120))
    assert M.shot_cut_accuracy([90], [40], 120, penalty=p) == pytest.approx(np.exp(-2 * p / 120))
    # one to one: a single detection between two requests matches only one of them.
    assert M.match_cost([60], [58, 62], p) == pytest.approx(2 + p)
    with pytest.raises(ValueError, match="num_frames"):
        M.shot_cut_accuracy([], [], 0)


def vbench_loop(features):
    """VBench's subject/background consistency loop over one video, transcribed in torch."""
    import torch
    import torch.nn.functional as F

    feats = F.normalize(torch.tensor(features, dtype=torch.float64), dim=-1, p=2)
    video_sim, cnt = 0.0, 0
    for i in range(len(feats)):
        f = feats[i].unsqueeze(0)
        if i == 0:
            first = f
        else:
            sim_pre = max(0.0, F.cosine_similarity(former, f).item())
            sim_fir = max(0.0, F.cosine_similarity(first, f).item())
            video_sim += (sim_pre + sim_fir) / 2
            cnt += 1
        former = f
    return video_sim, cnt


def test_vbench_consistency_matches_vbench_loop():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(9, 12)) + rng.normal(size=12)  # some negative cosines among them
    got = M.vbench_consistency(feats)
    sim, cnt = vbench_loop(feats)
    assert len(got) == cnt == 8 and sum(got) == pytest.approx(sim, rel=1e-12)
    # over two videos VBench divides the summed sims by the summed frame count: our per-frame
    # values averaged by clu give the same
    other = rng.normal(size=(4, 12))
    total = M.FilmMetrics.from_values({"subject_consistency": got}).merge(
        M.FilmMetrics.from_values({"subject_consistency": M.vbench_consistency(other)}))
    sim2, cnt2 = vbench_loop(other)
    assert float(total.compute()["subject_consistency"]) == pytest.approx((sim + sim2) / (cnt + cnt2),
                                                                          rel=1e-6)


def test_intra_shot_uses_detected_shots():
    frames = two_shot_film()
    detect_none = M.Scorers(cuts=lambda f: [])
    one = M.film_values(frames, [17], scorers=detect_none)
    two = M.film_values(frames, [17])            # the frame-difference detector finds 17
    assert len(one["subject_consistency"]) == 32 and len(two["subject_consistency"]) == 31
    assert min(one["subject_consistency"]) < min(two["subject_consistency"])  # the cut frame


def test_inter_shot_pairs_follow_character_tags():
    frames = two_shot_film(num_frames=30, cut=10)
    frames[20:] = frames[:10]                     # shot 3 repeats shot 1; shot 2 differs
    captions = ["[character1] waves", "a red car", "[character1] sits"]
    tagged = M.film_values(frames, [10, 20], scorers=M.Scorers(cuts=lambda f: [10, 20]),
                           captions=captions)["inter_shot_consistency"]
    assert tagged == pytest.approx([1.0])         # only shots 1 and 3 share a character
    untagged = M.film_values(frames, [10, 20], scorers=M.Scorers(cuts=lambda f: [10, 20]),
                             captions=["a", "b", "c"])["inter_shot_consistency"]
    assert len(untagged) == 3 and max(untagged) == pytest.approx(1.0) and min(untagged) < 0.9


def test_semantic_and_aesthetic_formulas():
    frames = two_shot_film()
    colour = lambda f: f.reshape(len(f), -1, 3).mean(axis=1)  # noqa: E731  frames -> RGB
    text = {"glob": [1.0, 0, 1.0], "red": [1.0, 0, 0], "blue": [0, 0, 1.0]}
    scorers = M.Scorers(clip=colour, clip_text=lambda caps: np.array([text[c] for c in caps]),
                        aesthetic=lambda f: np.full(len(f), 5.5), text_alignment=None)
    v = M.film_values(frames, [17], scorers=scorers, global_caption="glob",
                      captions=["red", "blue"])
    unit = lambda x: np.asarray(x, float) / np.linalg.norm(x)  # noqa: E731
    red, blue = unit(colour(frames[:1])[0]), unit(colour(frames[17:18])[0])
    film = unit(np.mean([unit(c) for c in colour(frames)], axis=0))
    assert v["semantic_shot"] == pytest.approx([red[0], blue[2]], rel=1e-2)
    assert v["semantic_global"] == pytest.approx([unit(text["glob"]) @ film], rel=1e-6)
    assert v["aesthetic_quality"] == pytest.approx([0.55])


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
