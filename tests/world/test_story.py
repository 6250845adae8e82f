"""The world's story: Wan cut geometry, shot counts, story order, the spec's JSON round trip."""
import json

import numpy as np
import pytest

from holocine_jax import world
from holocine_jax.shots import latent_num_frames, pixel_to_latent_cut

SEEDS = range(60)


@pytest.mark.parametrize("num_frames", [33, 81, 241])
def test_cuts_follow_wan_latent_geometry(num_frames):
    for seed in SEEDS:
        spec = world.sample_film(seed, num_frames=num_frames)
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
    assert (latent_num_frames(33) == 9 and pixel_to_latent_cut(5) == 2
            and pixel_to_latent_cut(29) == 8)


def test_shot_count_limits_and_errors():
    assert {world.sample_film(s, num_frames=33, num_shots=4).num_shots for s in range(5)} == {4}
    seen = {world.sample_film(s, num_frames=81).num_shots for s in range(200)}
    assert seen == {2, 3, 4, 5}
    with pytest.raises(ValueError, match="num_shots=5"):
        world.sample_film(0, num_frames=33, num_shots=5)  # 9 latent frames hold at most 4 shots
    with pytest.raises(ValueError, match="resolution"):
        world.render_film(world.sample_film(0), height=4, width=64)


def test_story_order_and_glass_states():
    for seed in SEEDS:
        spec = world.sample_film(seed, num_frames=81)
        actions = [s.action for s in spec.shots]
        assert actions.count("pour") == 1 and actions[0] == "enter"
        k = actions.index("pour")
        assert set(actions[1:k]) <= {"look"} and set(actions[k + 1:]) <= {"rest"}
        assert [s.glass for s in spec.shots] == (["empty"] * k + ["filling"] + ["full"] * (len(actions) - k - 1))


def test_spec_round_trips_through_json():
    spec = world.sample_film(3, num_frames=81)
    again = world.FilmSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    attrs = spec.shot_attributes()
    assert len(attrs) == spec.num_shots and attrs[-1]["end"] == 81
    assert {a["colour"] for a in attrs} == {spec.colour} and attrs[0]["framing"] == "wide"
    with pytest.raises(KeyError, match="room"):
        world.FilmSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "room"})
