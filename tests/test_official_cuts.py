"""Cut table: every requested cut of a 241-frame film lands on the latent frame the official
HoloCine scripts give it, through our sampling and manifest paths (eval samples through the
sampling path).

The official rule is written out below from `HoloCine_inference_*.py` (`enforce_4t_plus_1`,
`prepare_multishot_inputs`) and `WanVideoUnit_ShotEmbedder` (pixel -> latent cut); it calls
nothing of ours.
"""
import logging
import types

import pytest

from holocine_jax.data.manifest import FilmRecord, clip_cuts
from holocine_jax.prompts import build_prompt
from holocine_jax.sample.run import FilmRequest, film_layout
from holocine_jax.shots import ShotLayout
from holocine_jax.text.tokenizer import world_tokenizer

FRAMES = 241
PROMPT = build_prompt("A circle walks into a room.", ["The circle enters.", "The circle sits."])


def official_latent_cuts(num_frames, requested):
    """Latent frames starting shots 2..K in the official pipeline for requested pixel cuts."""
    def enforce_4t_plus_1(n):
        return 4 * round((n - 1) / 4) + 1

    total = enforce_4t_plus_1(num_frames)
    cuts = sorted(set(enforce_4t_plus_1(f) for f in requested))
    cuts = [f for f in cuts if 0 < f < total]
    latent_frames = (total - 1) // 4 + 1
    starts = [0]
    for f in sorted(cuts):
        if f > 0 and (f - 1) // 4 + 1 < latent_frames:
            starts.append((f - 1) // 4 + 1)
    return sorted(set(starts))[1:]


def sample_config():
    """Only the fields `film_layout` reads: 480x832 Wan geometry, a 128-token text."""
    ns = types.SimpleNamespace
    return ns(video=ns(num_frames=FRAMES, height=480, width=832), vae=ns(stride=(4, 8, 8)),
              model=ns(patch_size=(1, 2, 2), in_channels=16, text_len=128),
              shots=ns(max_shots=13, summary_frames=1, window_cross_attention=True))


def test_the_official_rule_differs_from_plain_mapping_on_90_cuts():
    # The finding of issue 17 (cut 40 at 81 frames: plain (p-1)//4+1 gives 10, official 11):
    # 90 of the 239 cuts differ, 88 a latent frame later, and 239, 240 snap onto the last frame
    # (241), where the official scripts drop the cut.
    plain = {c: [(c - 1) // 4 + 1] for c in range(2, FRAMES)}
    differ = [c for c in plain if official_latent_cuts(FRAMES, [c]) != plain[c]]
    later = [c for c in plain if official_latent_cuts(FRAMES, [c]) == [plain[c][0] + 1]]
    assert len(differ) == 90 and len(later) == 88 and 40 in later
    assert sorted(set(differ) - set(later)) == [239, 240]
    assert official_latent_cuts(FRAMES, [239]) == official_latent_cuts(FRAMES, [240]) == []
    assert official_latent_cuts(81, [40]) == [11]


def test_sampling_applies_every_cut_as_the_official_scripts(caplog):
    config, tok = sample_config(), world_tokenizer()
    for c in range(2, FRAMES):
        want = official_latent_cuts(FRAMES, [c])
        film = FilmRequest(PROMPT, (c,), FRAMES)
        if not want:  # the cut vanished: two captions cannot make one shot (official: silent)
            with pytest.raises(ValueError, match=rf"cuts \[{c}\] apply as \[\] .*: 1 shots, but "
                                                 "the prompt has 2 shot captions"):
                film_layout(config, film, tok)
            continue
        with caplog.at_level(logging.WARNING, logger="holocine_jax.sample.run"):
            caplog.clear()
            layout = film_layout(config, film, tok)
        assert layout.latent_cuts() == want, c
        snapped = layout.pixel_cuts() != [c]
        warned = [r for r in caplog.records if r.name == "holocine_jax.sample.run"]
        assert snapped == bool(warned), c  # a warning exactly when the cut moved
        if snapped:
            assert f"cuts [{c}] of a 241-frame film applied as {layout.pixel_cuts()}" in caplog.text


def test_manifest_clips_apply_every_cut_as_the_official_scripts():
    for c in range(2, FRAMES):
        want = official_latent_cuts(FRAMES, [c])
        record = FilmRecord(1, "v.mp4", "g", ("a", "b"), (c,))
        cuts, num_shots = clip_cuts(record, FRAMES, 15.0, 15.0, FRAMES, 13)
        assert num_shots == len(want) + 1, c  # a cut snapped past the clip drops its shot
        latent = ShotLayout.from_cuts(FRAMES, cuts, latent_hw=(1, 1), max_shots=13).latent_cuts()
        assert latent == want, c


def test_several_cuts_sort_and_merge_as_the_official_scripts():
    config, tok = sample_config(), world_tokenizer()
    three = build_prompt("A room.", ["The circle enters.", "The circle sits.", "It waits."])
    layout = film_layout(config, FilmRequest(three, (120, 38), FRAMES), tok)
    assert layout.latent_cuts() == official_latent_cuts(FRAMES, [120, 38]) == [10, 31]
    with pytest.raises(ValueError, match=r"cuts \[37, 38\] apply as \[37\] .*: 2 shots, but the "
                                         "prompt has 3 shot captions"):
        film_layout(config, FilmRequest(three, (37, 38), FRAMES), tok)
    assert official_latent_cuts(FRAMES, [37, 38]) == [10]  # official: merged, third caption unused
