"""Key derivation against keys/SPEC-v1.md and its golden vectors."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from dkit.derive import Stream, aes_keys, derive, key_id, permutation, rmt_matrices, subkey
from dkit.params import KeyParams
from dkit.secret import Seed

from conftest import REPO

VECTORS = json.loads((REPO / "keys" / "vectors" / "derivation-v1.json").read_text())
CASES = {c["name"]: c for c in VECTORS["cases"]}


def _hkdf_rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """An independent HKDF-SHA256 straight from RFC 5869, to check the one we use."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, i = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
        i += 1
    return okm[:length]


def test_subkey_is_rfc5869_hkdf():
    seed = Seed(bytes(range(32)))
    for label in ["perm", "rmt/0", "aes/block/17", "key-id"]:
        assert subkey(seed, label) == _hkdf_rfc5869(bytes(range(32)), b"dkit/derive/v1", label.encode(), 32)


def test_stream_is_aes_ctr_from_a_zero_counter():
    seed = Seed(bytes(range(32)))
    key = subkey(seed, "rmt/0")
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    counters = b"".join(i.to_bytes(16, "big") for i in range(4))
    assert Stream(key).read(64) == ecb.update(counters)


def test_primitive_vectors():
    pv = VECTORS["primitives"]
    seed = Seed(bytes.fromhex(pv["seed"]))
    assert subkey(seed, "perm").hex() == pv["subkey_perm"]
    assert subkey(seed, "rmt/0").hex() == pv["subkey_rmt_0"]
    assert Stream.for_label(seed, "rmt/0").read(32).hex() == pv["stream_rmt_0_first_32_bytes"]
    np.testing.assert_allclose(
        Stream.for_label(seed, "rmt/0").uniform(4), pv["uniform_rmt_0_first_4"], rtol=0, atol=1e-15
    )
    np.testing.assert_allclose(
        Stream.for_label(seed, "rmt/0").gaussian(5), pv["gaussian_rmt_0_first_5"], rtol=0, atol=1e-12
    )
    s = Stream.for_label(seed, "perm")
    assert [s.below(1000) for _ in range(4)] == pv["below_perm_1000_first_4"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_vectors(name):
    case = CASES[name]
    seed = Seed(bytes.fromhex(case["seed"]))
    params = KeyParams.from_dict(case["params"])
    assert params.canonical().decode() == case["canonical_params"]
    assert key_id(seed, params) == case["key_id"]
    if "perm" in case:
        perm = permutation(seed, params.positions)
        assert perm.tolist() == case["perm"]
        assert hashlib.sha256(perm.astype("<i8").tobytes()).hexdigest() == case["perm_sha256"]
    if "matrices_shape" in case:
        m = rmt_matrices(seed, params)
        assert list(m.shape) == case["matrices_shape"]
        if "matrices" in case:
            np.testing.assert_allclose(m.ravel(), case["matrices"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(m[0].ravel()[:16], case["matrices_first"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(m[-1].ravel()[-16:], case["matrices_last"], rtol=0, atol=1e-12)
        assert abs(np.abs(m).sum() - case["matrices_abs_sum"]) < 1e-9
    if "aes_key_0" in case:
        keys = aes_keys(seed, params)
        assert len(keys) == case["aes_key_count"]
        assert keys[0].hex() == case["aes_key_0"]
        assert hashlib.sha256(b"".join(keys)).hexdigest() == case["aes_keys_sha256"]


def test_every_mechanism_has_a_golden_case():
    covered = set()
    for c in CASES.values():
        p = c["params"]
        covered.update(p["pipeline"])
        if "rmt" in p:
            covered.update({"rmt:" + p["rmt"]["kind"], "rmt:" + p["rmt"]["channels"]})
        if "aes" in p:
            covered.add("aes:" + p["aes"]["keys"])
    assert covered >= {
        "identity",
        "perm",
        "rmt",
        "aes",
        "instahide",
        "rmt:orthogonal",
        "rmt:projection",
        "rmt:joint",
        "rmt:shared",
        "aes:shared",
        "aes:per-block",
    }


def test_matrices_have_the_promised_properties():
    seed = Seed.generate()
    ortho = rmt_matrices(seed, KeyParams.create("16x16x3", 4, "rmt"))
    eye = np.eye(48)
    for r in ortho:
        np.testing.assert_allclose(r.T @ r, eye, atol=1e-12)
    proj = rmt_matrices(seed, KeyParams.create("16x16x3", 4, "rmt", rmt_kind="projection"))
    assert all(np.linalg.cond(r) <= 20 * 48 for r in proj)
    assert not np.allclose(proj[0].T @ proj[0], eye, atol=1e-3)
    shared = rmt_matrices(seed, KeyParams.create("16x16x3", "4x2", "rmt", channels="shared"))
    assert shared.shape == (4 * 8, 2, 2)


def test_permutation_is_a_permutation_and_depends_on_the_seed():
    a, b = Seed.generate(), Seed.generate()
    for t in [1, 2, 3, 64, 1000]:
        p = permutation(a, t)
        assert sorted(p.tolist()) == list(range(t))
    assert permutation(a, 64).tolist() != permutation(b, 64).tolist()
    params = KeyParams.create("32x32x3", 4, "perm,aes")
    assert key_id(a, params) != key_id(b, params)
    assert aes_keys(a, params) != aes_keys(b, params)
    # The same seed under other parameters gives another key ID.
    assert key_id(a, params) != key_id(a, KeyParams.create("32x32x3", 4, "perm,aes", aes_keys="shared"))


_CHILD = textwrap.dedent("""
    import hashlib, sys, numpy as np
    from dkit.derive import derive
    from dkit.params import KeyParams
    from dkit.secret import Seed
    seed = Seed(bytes.fromhex(sys.stdin.read().strip()))
    for pl in ["perm,rmt", "perm,aes"]:
        m = derive(seed, KeyParams.create("32x32x3", 4, pl))
        if m.matrices is not None:
            np.save(sys.argv[1], m.matrices)
        print(m.key_id, m.perm.tolist(), hashlib.sha256(b"".join(m.aes or ())).hexdigest())
""")


def test_same_seed_same_material_in_two_processes(tmp_path):
    seed = Seed.generate()
    outputs = []
    for i in range(2):
        npy = tmp_path / f"m{i}.npy"
        r = subprocess.run(
            [sys.executable, "-c", _CHILD, str(npy)],
            input=seed.expose().hex(),
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append((r.stdout, np.load(npy)))
    assert outputs[0][0] == outputs[1][0]
    np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=0, atol=1e-12)
    here = derive(seed, KeyParams.create("32x32x3", 4, "perm,rmt"))
    np.testing.assert_allclose(here.matrices, outputs[0][1], rtol=0, atol=1e-12)
    assert outputs[0][0].split()[0] == here.key_id


def test_secrets_do_not_print_or_pickle():
    import pickle

    seed = Seed.generate()
    m = derive(seed, KeyParams.create("8x8x1", 4, "perm,aes"))
    for obj in (seed, m):
        text = repr(obj) + str(obj)
        assert seed.expose().hex() not in text and m.aes[0].hex() not in text
        with pytest.raises(TypeError):
            pickle.dumps(obj)
    assert "redacted" in repr(seed) and "redacted" in repr(m)
