import pytest

from dkit.errors import EXIT_USAGE, ParameterError
from dkit.params import KeyParams, parse_block, parse_pipeline, parse_shape


@pytest.mark.parametrize(
    "text,expected",
    [
        ("32x32x3", (32, 32, 3)),
        ("28x28", (28, 28, 1)),
        ("224X224X3", (224, 224, 3)),
        (" 8 x 4 x 1", (8, 4, 1)),
    ],
)
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize(
    "text", ["", "32", "32x", "x32x3", "32x32x3x1", "32*32*3", "-1x32x3", "0x32x3", "32x32x0", "axbxc"]
)
def test_malformed_shape_is_a_usage_error(text):
    with pytest.raises(ParameterError) as e:
        parse_shape(text)
    assert e.value.exit_code == EXIT_USAGE
    assert repr(text) in str(e.value)


@pytest.mark.parametrize("text,expected", [("4", (4, 4)), ("4x2", (4, 2)), (7, (7, 7))])
def test_parse_block(text, expected):
    assert parse_block(text) == expected


@pytest.mark.parametrize("text", ["0", "4x", "four", "4x0", "-2"])
def test_malformed_block(text):
    with pytest.raises(ParameterError):
        parse_block(text)


def test_pipeline_is_canonical_and_validated():
    assert parse_pipeline("rmt,perm") == ("perm", "rmt")
    assert parse_pipeline(["AES", " perm "]) == ("perm", "aes")
    for bad, words in [
        ("perm,rot", "unknown mechanism 'rot'"),
        ("rmt,aes", "choose one"),
        ("identity,perm", "cannot be combined"),
        ("", "empty"),
        ("perm,perm", "twice"),
        ("instahide,perm", "alone"),
    ]:
        with pytest.raises(ParameterError, match=words):
            parse_pipeline(bad)


def test_block_must_tile_the_image():
    with pytest.raises(ParameterError, match=r"block 5x5 does not tile a 32x32 image \(32 is not a multiple of 5\)"):
        KeyParams.create("32x32x3", 5)
    with pytest.raises(ParameterError, match="28 is not a multiple of 3"):
        KeyParams.create("28x28", "7x3")
    assert KeyParams.create("28x28", "7x4").positions == 4 * 7


def test_mechanism_settings_are_checked():
    with pytest.raises(ParameterError, match="unknown rmt kind"):
        KeyParams.create("32x32x3", 4, "rmt", rmt_kind="rotation")
    with pytest.raises(ParameterError, match="channel mode"):
        KeyParams.create("32x32x3", 4, "rmt", channels="mixed")
    with pytest.raises(ParameterError, match="noise"):
        KeyParams.create("32x32x3", 4, "rmt", noise=300)
    with pytest.raises(ParameterError, match="setting of rmt"):
        KeyParams.create("32x32x3", 4, "perm", noise=10)
    with pytest.raises(ParameterError, match="at least 16 bytes"):
        KeyParams.create("32x32x3", 2, "aes")
    with pytest.raises(ParameterError, match=r"bound"):
        KeyParams.create("32x32x3", 4, "instahide", k=4, bound=0.2)
    with pytest.raises(ParameterError, match="too large"):
        KeyParams.create("1024x1024x3", 32, "rmt")


def test_defaults_and_round_trip():
    p = KeyParams.create("32x32x3", 4, "perm,rmt")
    assert p.noise == 25.0 and p.rmt_kind == "orthogonal" and p.channels == "joint"
    assert (p.grid, p.positions, p.block_size, p.matrix_side) == ((8, 8), 64, 48, 48)
    assert KeyParams.from_dict(p.to_dict()) == p
    q = KeyParams.create("32x32x3", 4, "rmt", channels="shared")
    assert q.matrix_side == 4
    # Settings of mechanisms outside the pipeline are not part of the public form.
    assert "aes" not in p.to_dict() and "instahide" not in p.to_dict()
    assert p.canonical() == (
        b'{"block":[4,4],"pipeline":["perm","rmt"],"rmt":{"channels":"joint",'
        b'"kind":"orthogonal","noise":25.0},"shape":[32,32,3],"spec":1}'
    )


def test_from_dict_rejects_damage():
    d = KeyParams.create("32x32x3", 4).to_dict()
    for broken in [
        {**d, "shape": [32, 32]},
        {**d, "pipeline": ["nope"]},
        {k: v for k, v in d.items() if k != "block"},
        {**d, "spec": 9},
        {**d, "shape": [0, 0, 0], "block": [1, 1]},  # a stored form is held to the same bounds as a new key
        {**d, "shape": [100000, 100000, 3], "block": [1, 1], "pipeline": ["perm"]},
        {**d, "pipeline": ["instahide"], "instahide": {"k": 1, "bound": float("nan"), "mix": "inside"}},
        {**d, "pipeline": ["instahide"], "instahide": {"k": 1, "bound": -5.0, "mix": "inside"}},
    ]:
        with pytest.raises(ParameterError):
            KeyParams.from_dict(broken)


def test_instahide_k1_needs_bound_1():
    """k=1 with the default bound 0.65 used to be accepted, then every encode failed."""
    with pytest.raises(ParameterError, match="k=1"):
        KeyParams.create("8x8", 4, "instahide", k=1)
    assert KeyParams.create("8x8", 4, "instahide", k=1, bound=1.0).k == 1
