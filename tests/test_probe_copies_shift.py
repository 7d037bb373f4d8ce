"""The theory behind benchmarks/probe_copies_shift.py: a one-pixel shifted copy next to its copy 0
gives the cloud the key. Without noise the probe must recover every block's matrix exactly;
with the default noise it must still come close (the figures on natural images are in
SECURITY.md, "Copies")."""

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dkit.derive import derive
from dkit.engine import Disguise, RandomSource
from dkit.params import KeyParams
from dkit.secret import Seed

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "probe_copies_shift.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("probe_copies_shift", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def copies(probe, noise: float, n: int):
    params = KeyParams.create("32x32", 8, "rmt", noise=noise)
    key = Disguise(derive(Seed(hashlib.sha256(f"probe test {noise}".encode()).digest()), params))
    plain = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 1)).astype(np.float64)
    return key.material.matrices, probe.shifted_copies(key, plain, RandomSource.fixed(2)), noise**2 / 12


def test_exact_maps_give_the_matrix_up_to_sign(probe):
    m = derive(Seed(bytes(32)), KeyParams.create("32x32", 8, "rmt", noise=25)).matrices[3]
    s_h, s_v = probe.shift_matrix(0, 1), probe.shift_matrix(1, 0)
    got = probe.solve_key([(m.T @ s_h @ m, s_h), (m.T @ s_v @ m, s_v)])
    assert min(np.linalg.norm(got - m), np.linalg.norm(got + m)) < 1e-6


@pytest.mark.parametrize("j", [0, 5])  # a corner (no neighbour feeds it) and an inner position
def test_noise_free_copies_give_the_key(probe, j):
    mats, ys, var = copies(probe, 0.0, 400)
    got = probe.recover_matrix(*ys, j, 4, var)
    assert min(np.linalg.norm(got - mats[j]), np.linalg.norm(got + mats[j])) < 1e-5


def test_default_noise_costs_precision_not_the_key(probe):
    """With the default noise 25 the noise-corrected regression still finds the key, given images
    with energy in every direction (uniform noise images here; natural images have little in most,
    which is why the probe needs thousands of pairs on CIFAR)."""
    mats, ys, var = copies(probe, 25.0, 1500)
    got = probe.recover_matrix(*ys, 5, 4, var)
    assert min(np.linalg.norm(got - mats[5]), np.linalg.norm(got + mats[5])) / 8 < 0.1
