"""ShotLayout: construction, validation, derived geometry against hand-written expectations."""
import ast
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from holocine_jax import shots
from holocine_jax.shots import (ShotLayout, even_cuts, latent_num_frames, latent_shape,
                                latent_to_pixel_cut, pixel_to_latent_cut, shot_bounds,
                                snap_4t_plus_1, snap_cuts)


def test_frame_arithmetic_follows_the_4t_plus_1_rules():
    assert [latent_num_frames(n) for n in (1, 5, 81, 241, 961)] == [1, 2, 21, 61, 241]
    # A cut at pixel frame p starts latent frame ceil(p / 4).
    for p in range(1, 200):
        assert pixel_to_latent_cut(p) == -(-p // 4)
    # 4t+1 cuts round-trip exactly; latent frame j >= 1 decodes from pixel 4j-3.
    for j in range(1, 60):
        assert pixel_to_latent_cut(latent_to_pixel_cut(j)) == j
        assert latent_to_pixel_cut(j) == 4 * j - 3
    # Python rounds half to even: 243 -> 241, 247 -> 249.
    snapped = [snap_4t_plus_1(n) for n in (240, 241, 242, 243, 247, 36, 38)]
    assert snapped == [241, 241, 241, 241, 249, 37, 37]
    with pytest.raises(ValueError, match="num_frames=240"):
        latent_num_frames(240)


def test_even_cuts_match_the_official_auto_rule():
    def official(total, shots):  # HoloCine's `prepare_multishot_inputs`, written out.
        step = total / shots
        cuts = [4 * round((round(i * step) - 1) / 4) + 1 for i in range(1, shots)]
        return [c for c in sorted(set(cuts)) if 0 < c < total]

    for total in (81, 121, 241):
        for shots in range(1, 9):
            assert even_cuts(total, shots) == official(total, shots), (total, shots)
    with pytest.raises(ValueError, match="too few"):
        even_cuts(9, 5)


def test_snap_cuts_snaps_merges_sorts_and_keeps_the_film():
    # nearest 4t+1 with half to even (39 -> 41, 35 -> 33); 120 before 38 is sorted.
    assert snap_cuts(241, [120, 38, 39, 35]) == [33, 37, 41, 121]
    assert snap_cuts(241, [37, 38, 36]) == [37]                  # all three snap to 37
    assert snap_cuts(241, [0, 2, 3, 239, 240, 300]) == [1]       # 0..3 -> 1; 239.. -> 241+ dropped
    assert snap_cuts(81, np.array([40])) == [41] and snap_cuts(81, []) == []
    with pytest.raises(ValueError, match=r"cut frame 37.5 is not an integer"):
        snap_cuts(241, [37.5])
    with pytest.raises(ValueError, match="num_frames=240"):
        snap_cuts(240, [37])


def test_from_cuts_geometry():
    layout = ShotLayout.from_cuts(41, [13, 29], latent_hw=(2, 3), max_shots=4)
    assert layout.static_maxima == (11, 6, 4, 1)
    assert layout.num_tokens == 66
    np.testing.assert_array_equal(layout.shot_starts, [0, 4, 8, 11])  # padding shot starts at F
    assert int(layout.num_shots) == 3
    np.testing.assert_array_equal(layout.shot_lengths(), [4, 4, 3, 0])
    np.testing.assert_array_equal(layout.frame_to_shot(), [0] * 4 + [1] * 4 + [2] * 3)
    summary_frames = np.zeros(11, bool)
    summary_frames[[0, 4, 8]] = True
    np.testing.assert_array_equal(layout.frame_is_summary(), summary_frames)
    np.testing.assert_array_equal(layout.token_shot_id(), np.repeat([0] * 4 + [1] * 4 + [2] * 3, 6))
    np.testing.assert_array_equal(layout.token_is_summary(), np.repeat(summary_frames, 6))
    assert layout.latent_cuts() == [4, 8] and layout.pixel_cuts() == [13, 29]
    np.testing.assert_array_equal(layout.rope_frame_positions(), np.arange(11))


def test_summary_frames_and_single_shot():
    layout = ShotLayout.from_latent_cuts(9, [3, 7], latent_hw=(1, 1), max_shots=3, summary_frames=2)
    np.testing.assert_array_equal(layout.frame_is_summary(), [1, 1, 0, 1, 1, 0, 0, 1, 1])
    single = ShotLayout.from_latent_cuts(5, [], latent_hw=(1, 2), max_shots=2)
    np.testing.assert_array_equal(single.token_shot_id(), np.zeros(10))
    assert single.self_attention_mask("sparse").all()
    assert single.self_attention_mask("independent").all()


def test_self_attention_predicates_against_loops():
    layout = ShotLayout.from_latent_cuts(7, [2, 5], latent_hw=(1, 2), max_shots=5)
    shot = np.repeat([0, 0, 1, 1, 1, 2, 2], 2)
    first = np.repeat([1, 0, 1, 0, 0, 1, 0], 2).astype(bool)
    expect = {
        "sparse": lambda i, j: shot[i] == shot[j] or first[j],
        "independent": lambda i, j: shot[i] == shot[j],
        "full": lambda i, j: True,
    }
    for mode, rule in expect.items():
        want = np.array([[rule(i, j) for j in range(14)] for i in range(14)])
        np.testing.assert_array_equal(layout.self_attention_mask(mode), want, err_msg=mode)
    own = np.array([[shot[i] == shot[j] and first[j] for j in range(14)] for i in range(14)])
    np.testing.assert_array_equal(layout.own_summary_mask(), own)


def test_cross_attention_predicate():
    windows = [[0, 4], [3, 7], [6, 10]]  # global, shot 0, shot 1 (overlap by a token)
    layout = ShotLayout.from_latent_cuts(3, [1], latent_hw=(1, 1), max_shots=3,
                                         text_windows=windows, text_pad_start=11)
    mask = np.asarray(layout.cross_attention_mask(13))
    t = np.arange(13)
    glob, pad = t < 4, t >= 11
    np.testing.assert_array_equal(mask[0], glob | ((t >= 3) & (t < 7)) | pad)
    np.testing.assert_array_equal(mask[1], glob | ((t >= 6) & (t < 10)) | pad)
    np.testing.assert_array_equal(mask[2], mask[1])
    assert np.asarray(layout.without_text_windows().cross_attention_mask(13)).all()
    no_windows = ShotLayout.from_latent_cuts(3, [1], latent_hw=(1, 1), max_shots=3)
    assert np.asarray(no_windows.cross_attention_mask(13)).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(latent_cuts=[0, 3]), "latent cut 0 is out of range"),
    (dict(latent_cuts=[3, 8]), "latent cut 8 is out of range"),
    (dict(latent_cuts=[4, 2]), "must increase: 2 follows 4"),
    (dict(latent_cuts=[4, 4]), "must increase: 4 follows 4"),
    (dict(latent_cuts=[1, 2, 3, 4]), "5 shots exceed max_shots=4"),
    (dict(latent_cuts=[2, 3], summary_frames=2), "shot 1 has 1 latent frame"),
    (dict(latent_cuts=[2], text_windows=[[0, 2], [2, 4], [4, 6], [6, 8]], text_pad_start=9),
     "3 shot text windows for 2 shots"),
    (dict(latent_cuts=[2], text_windows=[[0, 2], [2, 4], [4, 6]]), "go together"),
    (dict(latent_cuts=[2], text_windows=[[0, 2], [5, 4], [4, 6]], text_pad_start=9),
     r"text window 1 = \[5, 4\)"),
])
def test_validation_names_the_offending_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShotLayout.from_latent_cuts(8, latent_hw=(2, 2), max_shots=4, **kwargs)


def test_pixel_cut_validation():
    with pytest.raises(ValueError, match="cut frame 81 is out of range"):
        ShotLayout.from_cuts(81, [37, 81], latent_hw=(2, 2), max_shots=4)
    with pytest.raises(ValueError, match="38 follows 37"):  # same latent frame 10
        ShotLayout.from_cuts(81, [37, 38], latent_hw=(2, 2), max_shots=4)
    with pytest.raises(ValueError, match="num_frames=80"):
        ShotLayout.from_cuts(80, [37], latent_hw=(2, 2), max_shots=4)


def test_stack_and_jit_without_recompiles():
    layouts = [ShotLayout.from_latent_cuts(12, cuts, latent_hw=(1, 2), max_shots=4)
               for cuts in ([3, 7], [], [1, 2, 11])]
    batch = ShotLayout.stack(layouts)
    assert batch.shot_starts.shape == (3, 4) and batch.text_windows.shape == (3, 5, 2)
    traces = []

    @jax.jit
    def ids(layout):
        traces.append(1)
        return layout.token_shot_id(), layout.token_is_summary()

    for i, layout in enumerate(layouts):
        got_ids, got_summary = ids(layout)
        np.testing.assert_array_equal(got_ids, batch.token_shot_id()[i])
        np.testing.assert_array_equal(got_summary, batch.token_is_summary()[i])
    assert len(traces) == 1
    other = ShotLayout.from_latent_cuts(12, [3], latent_hw=(1, 2), max_shots=5)
    with pytest.raises(ValueError, match="different maxima"):
        ShotLayout.stack([layouts[0], other])
    assert jnp.shape(layouts[0].broadcast_to_batch(6).num_shots) == (6,)


@pytest.mark.parametrize("summary_frames", [1, 2])
def test_num_allowed_pairs_counts_the_dense_mask(summary_frames):
    rng = np.random.default_rng(summary_frames)
    for _ in range(5):
        k = int(rng.integers(1, 5))
        cuts = sorted(rng.choice(np.arange(1, 6), size=k - 1, replace=False) * 2)
        layout = ShotLayout.from_latent_cuts(12, cuts, latent_hw=(2, 3), max_shots=5,
                                             summary_frames=summary_frames)
        for mode in ("sparse", "full", "independent"):
            assert layout.num_allowed_pairs(mode) == int(np.asarray(layout.self_attention_mask(mode)).sum())


def test_even_cuts_need_a_shot():
    assert even_cuts(81, 1) == []
    with pytest.raises(ValueError, match="num_shots=0"):
        even_cuts(81, 0)


def test_shot_bounds_in_pixel_frames():
    assert shot_bounds(41, [13, 29]) == [(0, 13), (13, 29), (29, 41)]
    assert shot_bounds(41, []) == [(0, 41)]
    with pytest.raises(ValueError, match=r"cut frames \[29, 13\] are not increasing"):
        shot_bounds(41, [29, 13])
    with pytest.raises(ValueError, match="not increasing inside"):
        shot_bounds(41, [41])


def run_config(height=480, width=832, num_frames=241, patch_size=(1, 2, 2), summary_frames=1,
               window_cross_attention=True):
    """A duck-typed run config with only the fields shots.py reads (no configs/ import)."""
    ns = types.SimpleNamespace
    return ns(video=ns(num_frames=num_frames, height=height, width=width),
              vae=ns(stride=(4, 8, 8)), model=ns(patch_size=patch_size, in_channels=16),
              shots=ns(max_shots=13, summary_frames=summary_frames,
                       window_cross_attention=window_cross_attention))


def test_a_configs_latents_and_token_grid_follow_the_holocine_numbers():
    # 480x832, 241 frames -> 61 latent frames of 60x104 latents = 30x52 = 1560 tokens (§3).
    config = run_config()
    assert latent_shape(config, 2) == (2, 61, 60, 104, 16)
    assert latent_shape(config, num_frames=81) == (1, 21, 60, 104, 16)
    layout = ShotLayout.for_config(config, [37, 121])
    assert layout.static_maxima == (61, 1560, 13, 1)
    assert layout.latent_cuts() == [10, 31]
    assert ShotLayout.for_config(config, [], num_frames=81).num_latent_frames == 21
    # the patch size and the summary frames are read from the config
    assert ShotLayout.for_config(run_config(patch_size=(1, 1, 1)), []).tokens_per_frame == 60 * 104
    assert ShotLayout.for_config(run_config(summary_frames=2), [37]).summary_frames == 2
    with pytest.raises(ValueError, match="484x832 is not divisible by the VAE stride"):
        latent_shape(run_config(height=484))
    with pytest.raises(ValueError, match="num_frames=240"):
        ShotLayout.for_config(config, [], num_frames=240)


def test_for_config_is_from_cuts_on_the_configs_grid():
    windows, pad = [[0, 5], [5, 9], [9, 14]], 14
    got = ShotLayout.for_config(run_config(), [97], text_windows=windows, text_pad_start=pad)
    want = ShotLayout.from_cuts(241, [97], latent_hw=(30, 52), max_shots=13,
                                text_windows=windows, text_pad_start=pad)
    assert got.static_maxima == want.static_maxima
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="14 shots exceed max_shots=13"):
        ShotLayout.for_config(run_config(), even_cuts(241, 14))


def test_without_window_cross_attention_every_shot_reads_every_caption():
    windows, pad = [[0, 5], [5, 9], [9, 14]], 14
    windowed = ShotLayout.for_config(run_config(num_frames=9, height=16, width=16), [5],
                                     text_windows=windows, text_pad_start=pad)
    mask = np.asarray(windowed.cross_attention_mask(16))        # [L, 16]
    assert not mask.all() and mask[:, :5].all()                  # global caption for everyone
    config = run_config(num_frames=9, height=16, width=16, window_cross_attention=False)
    plain = ShotLayout.for_config(config, [5], text_windows=windows, text_pad_start=pad)
    assert np.asarray(plain.cross_attention_mask(16)).all()
    np.testing.assert_array_equal(plain.shot_starts, windowed.shot_starts)


def test_shots_imports_no_other_holocine_module():
    tree = ast.parse(pathlib.Path(shots.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("holocine_jax", "configs")], names
