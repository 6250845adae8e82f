"""The attribute reader recovers the world's ground truth from rendered pixels."""
import collections

import numpy as np
import pytest

from holocine_jax import world
from holocine_jax.world import read_film, read_shot

KEYS = ("colour", "pattern", "shape", "room", "entry_side", "glass", "framing")


@pytest.mark.parametrize("size,num_frames,seeds", [(64, 33, 30), (96, 81, 6)])
def test_reader_recovers_ground_truth_renders(size, num_frames, seeds):
    wrong, unread, shots = collections.Counter(), collections.Counter(), 0
    for seed in range(seeds):
        frames, spec = world.make_film(seed, height=size, width=size, num_frames=num_frames)
        for got, truth, shot in zip(read_film(frames, spec.cut_frames), spec.shot_attributes(),
                                    spec.shots):
            shots += 1
            for key in KEYS:
                if got[key] is None:
                    unread[key] += 1
                    # only the shape of a character cut off on two sides (close-up camera 1)
                    assert key == "shape" and (shot.framing, shot.camera) == ("close-up", 1)
                elif got[key] != truth[key]:
                    wrong[key] += 1
    assert not wrong, wrong
    assert unread["shape"] < 0.3 * shots


def test_reader_sees_changed_attributes():
    """Swapping the colour, room or pattern of a film changes exactly that reading."""
    spec = world.sample_film(5, num_frames=33)
    base = read_shot(world.render_film(spec))
    for field, value in (("colour", "purple" if spec.colour != "purple" else "red"),
                         ("room", "office" if spec.room != "office" else "kitchen"),
                         ("entry_side", "left" if spec.entry_side == "right" else "right")):
        changed = world.FilmSpec.from_dict({**spec.to_dict(), field: value})
        got = read_shot(world.render_film(changed))
        assert got[field] == value and got[field] != base[field]


def test_reader_on_empty_frames_and_bad_input():
    grey = np.full((4, 32, 32, 3), 128, np.uint8)
    got = read_shot(grey)
    assert got["colour"] is None and got["shape"] is None
    with pytest.raises(ValueError, match="uint8"):
        read_shot(grey.astype(np.float32))


def test_reader_through_the_tiny_autoencoder_reads_colour_and_abstains_on_blur():
    """The tiny config's DCT autoencoder blends marks into the body (a 0.75 shade) and outlines
    into the room: the colour must still be read in every shot, and pattern / shape read only where
    they survive (it abstains where blurred), so the round trip of a consistent film reads as
    consistent."""
    import jax.numpy as jnp
    from holocine_jax.config import load_config
    from holocine_jax.eval.metrics import world_attribute_values
    from holocine_jax.sample.output import to_uint8
    from holocine_jax.vae import make_vae

    vae = make_vae(load_config("tiny"))
    same, wrong, read, total = [], collections.Counter(), collections.Counter(), 0
    for seed in range(16):
        frames, spec = world.make_film(seed, height=64, width=64, num_frames=33, shot_range=(2, 4))
        z = vae.encode(jnp.asarray(frames[None], jnp.float32) / 127.5 - 1.0)
        video = to_uint8(vae.decode(z)[0])
        shots = read_film(video, spec.cut_frames)
        total += len(shots)
        same += world_attribute_values(shots, spec.shot_attributes())["identity_consistency"]
        for got in shots:
            for key in ("colour", "pattern", "shape"):
                read[key] += got[key] is not None
                wrong[key] += got[key] not in (None, getattr(spec, key))
    assert read["colour"] == total and wrong["colour"] == 0, (read, wrong)
    assert len(same) >= 16 and np.mean(same) >= 0.9, (np.mean(same), len(same))
    assert wrong["pattern"] + wrong["shape"] <= 0.1 * total, (wrong, read)
