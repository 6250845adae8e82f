"""Film outputs: the contact sheet layout (a row per shot, cut frames outlined) and the files."""
import json

import numpy as np
import pytest
from PIL import Image

from holocine_jax.data.video import read_video
from holocine_jax.sample.output import CUT_MARK, contact_sheet, to_uint8, write_film


def numbered_film(t=17, h=8, w=10):
    """Frame f is filled with grey level 10 f, so every thumbnail says which frame it shows."""
    return np.repeat(np.arange(t, dtype=np.uint8)[:, None, None, None] * 10, h * w * 3).reshape(
        t, h, w, 3)


def test_contact_sheet_rows_and_cut_marks():
    frames = numbered_film()
    sheet = contact_sheet(frames, [5, 13], columns=3, border=2)
    ch, cw = 8 + 4, 10 + 4
    assert sheet.shape == (3 * ch + 2 * 2, 3 * cw + 2 * 2, 3)
    # Row k, column j shows frame linspace(start, end - 1, 3)[j] of shot k (half to even).
    want = [[0, 2, 4], [5, 8, 12], [13, 14, 16]]
    for r, row in enumerate(want):
        for c, f in enumerate(row):
            y, x = r * (ch + 2), c * (cw + 2)
            np.testing.assert_array_equal(sheet[y + 2:y + 2 + 8, x + 2:x + 2 + 10], frames[f])
            corner = tuple(sheet[y, x])
            assert (corner == CUT_MARK) == (f in (5, 13)), (r, c, corner)


def test_short_shot_pads_with_white_and_bad_input():
    sheet = contact_sheet(numbered_film(t=9), [7], columns=4, border=0)
    assert sheet.shape[0] == 2 * 8 + 2
    assert (sheet[10:, 2 * (10 + 2):] == 255).all()  # shot 2 has 2 frames: columns 3-4 empty
    with pytest.raises(ValueError, match="not increasing"):
        contact_sheet(numbered_film(), [5, 5])
    with pytest.raises(ValueError, match="uint8"):
        contact_sheet(numbered_film().astype(np.float32), [5])


def test_to_uint8_rounds_and_clips():
    np.testing.assert_array_equal(to_uint8(np.array([-2.0, -1.0, 0.0, 1.0, 3.0])),
                                  [0, 0, 128, 255, 255])


def test_write_film_files(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (9, 16, 16, 3), dtype=np.uint8)
    paths = write_film(str(tmp_path / "f"), frames, fps=8, cut_frames=[5],
                       metadata=dict(prompt="p", seed=3))
    assert read_video(paths["mp4"]).shape == (9, 16, 16, 3)
    assert np.asarray(Image.open(paths["contact_sheet"])).shape[0] == 2 * 20 + 2
    info = json.load(open(paths["json"]))
    assert info == dict(prompt="p", seed=3, cut_frames=[5], num_frames=9, height=16, width=16,
                        fps=8.0)
