"""Float pixels are never guessed: 0..1 images are refused with a hint or scaled on request (issue 10)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dkit.data.decode import DecodeError, Policy, convert_array
from dkit.engine import Disguise
from dkit.errors import EXIT_ACTION, InputError

from helpers import test_key

RNG = np.random.default_rng(7)
PLAIN = RNG.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)


def test_fractional_floats_are_refused_without_a_range():
    with pytest.raises(DecodeError, match="look scaled to 0..1") as e:
        convert_array(PLAIN[0] / 255.0, "row 0", Policy((8, 8, 3)))
    assert "--float-range 0-1" in e.value.hint
    with pytest.raises(DecodeError, match="not whole pixel values"):
        convert_array(PLAIN[0] + 0.25, "row 0", Policy((8, 8, 3)))
    with pytest.raises(DecodeError, match="all 0 or 1"):  # a 0/1 float image is ambiguous too
        convert_array((PLAIN[0] > 127).astype(np.float32), "row 0", Policy((8, 8, 3)))


def test_whole_floats_pass_unchanged_and_ranges_convert_with_a_note():
    img, notes = convert_array(PLAIN[0].astype(np.float32), "row 0", Policy((8, 8, 3)))
    assert img.dtype == np.uint8 and np.array_equal(img, PLAIN[0]) and notes == ()
    img, notes = convert_array(PLAIN[0] / 255.0, "row 0", Policy((8, 8, 3), float_range="0-1"))
    assert np.array_equal(img, PLAIN[0]) and "float 0..1 scaled x255" in notes
    img, notes = convert_array(PLAIN[0] + 0.2, "row 0", Policy((8, 8, 3), float_range="0-255"))
    assert np.array_equal(img, PLAIN[0]) and "float 0..255 rounded" in notes
    with pytest.raises(DecodeError, match="not 0..1"):
        convert_array(PLAIN[0].astype(np.float32), "row 0", Policy((8, 8, 3), float_range="0-1"))
    with pytest.raises(InputError, match="unknown float range"):
        Policy((8, 8, 3), float_range="0..1")


def test_engine_refuses_images_scaled_to_0_1():
    d = Disguise.from_key(test_key("f", shape="8x8x3", block="4", pipeline="perm,rmt"))
    for x in (PLAIN / 255.0, torch.from_numpy(PLAIN / 255.0).float()):
        with pytest.raises(InputError, match="scaled to 0..1") as e:
            d.apply(x)
        assert "255" in e.value.hint
    assert d.apply(PLAIN.astype(np.float32)).shape == PLAIN.shape  # 0..255 floats still pass


def test_cli_disguise_of_a_float_array(cli, tmp_path):
    src = tmp_path / "dogs_float.npy"
    np.save(src, PLAIN / 255.0)
    assert cli("keygen", "k", "--shape", "8x8x3", "--block", "4", "--pipeline", "perm,rmt").exit_code == 0
    out = tmp_path / "out.h5"
    r = cli("disguise", src, out, "--key", "k")
    assert r.exit_code == EXIT_ACTION and "look scaled to 0..1" in r.output and "--float-range" in r.output
    assert not out.exists() and not (tmp_path / "out.h5.partial").exists()
    r = cli("disguise", src, out, "--key", "k", "--float-range", "0-1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["conversions"] == {"float 0..1 scaled x255": 6}
    r = cli("inspect", out, "--json")
    assert json.loads(r.stdout)["options"]["float_range"] == "0-1"
