"""Whole-disguise golden vectors (keys/vectors/disguise-v1.json), with the randomness injected."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dkit.derive import derive
from dkit.engine import Disguise, RandomSource
from dkit.params import KeyParams
from dkit.secret import Seed

from conftest import REPO

DOC = json.loads((REPO / "keys" / "vectors" / "disguise-v1.json").read_text())
CASES = {c["name"]: c for c in DOC["cases"]}


def test_every_mechanism_has_a_disguise_vector():
    pipes = {m for c in CASES.values() for m in c["params"]["pipeline"]}
    assert pipes == {"identity", "perm", "rmt", "aes", "instahide"}
    mixes = {c["params"]["instahide"]["mix"] for c in CASES.values() if "instahide" in c["params"]}
    assert mixes == {"inside", "cross"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_disguise_vector(name):
    c = CASES[name]
    params = KeyParams.from_dict(c["params"])
    d = Disguise.from_key(derive(Seed(bytes.fromhex(c["seed"])), params))
    assert d.key_id == c["key_id"]
    x = np.frombuffer(bytes.fromhex(c["input_uint8_hex"]), dtype=np.uint8).reshape((-1,) + params.shape)
    rng = RandomSource.fixed(bytes.fromhex(c["random_root"]))
    if "encodings" in c:
        pool = None
        if "public_uint8_hex" in c:
            pool = np.frombuffer(bytes.fromhex(c["public_uint8_hex"]), dtype=np.uint8).reshape((-1,) + params.shape)
        enc, soft = d.encode(
            x, np.array(c["labels"]), num_classes=c["num_classes"], encodings=c["encodings"], pool=pool, rng=rng
        )
        np.testing.assert_allclose(enc.ravel(), c["output"], rtol=0, atol=2e-5)
        np.testing.assert_allclose(soft.ravel(), c["soft_labels"], rtol=0, atol=1e-6)
        return
    y = d.apply(x, rng=rng)
    if "noise_uint16_first_8" in c:
        assert (
            d.noise_for(RandomSource.fixed(bytes.fromhex(c["random_root"])), 0, 1).ravel()[:8].tolist()
            == c["noise_uint16_first_8"]
        )
    if "output_uint8_hex" in c:
        assert np.all(y == np.round(y))
        assert y.astype(np.uint8).tobytes().hex() == c["output_uint8_hex"]
    else:
        np.testing.assert_allclose(y.ravel(), c["output"], rtol=0, atol=2e-3)
    # And the owner's inverse goes back (exactly for integer mechanisms, closely without noise).
    if not d.noise:
        np.testing.assert_allclose(d.reveal(y), x, rtol=0, atol=0.05)


def test_noise_bytes_follow_the_spec():
    """noise draws for image n = AES-256-CTR keystream of HKDF(root, "noise") at byte n*H*W*C*2."""
    root = bytes(range(32))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"dkit/random/v1", info=b"noise").derive(root)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    stream = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(64)))
    d = Disguise.from_key(derive(Seed.generate(), KeyParams.create("4x4x1", 2, "rmt", noise=10)))
    per = 4 * 4 * 1 * 2
    for n in range(3):
        got = d.noise_for(RandomSource.fixed(root), n, 1).ravel()
        want = np.frombuffer(stream[n * per : (n + 1) * per], dtype="<u2")
        assert got.tolist() == want.tolist()
