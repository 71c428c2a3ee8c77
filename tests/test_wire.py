"""The wire format (docs/PROTOCOL.md): round trips, every field checked, and random damage
giving only WireError."""
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from xnorcdl import wire
from xnorcdl.errors import WireError

MID = "ab" * 32


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 5), hw=st.integers(1, 6),
       dtype=st.sampled_from(["float32", "float16"]), comp=st.sampled_from(["none", "zlib"]),
       seed=st.integers(0, 2**31))
def test_round_trip(n, c, hw, dtype, comp, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    ids = rng.integers(0, 2**63, n, dtype=np.uint64)
    data = wire.encode(wire.FEATURES, MID, ids, x, dtype, comp)
    msg = wire.decode(data, wire.FEATURES, MID, (c, hw, hw))
    np.testing.assert_array_equal(msg.ids, ids)
    want = x if dtype == "float32" else x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(msg.array, want)  # float32 exact; float16 as rounded once
    assert msg.wire_bytes == len(data) and msg.dtype == dtype and msg.compression == comp
    if comp == "none":
        assert len(data) == 48 + 8 * n + 16 + 8 + x.size * (4 if dtype == "float32" else 2)


def _msg(n=2, shape=(3, 2, 2)):
    return wire.encode(wire.FEATURES, MID, np.arange(n), np.ones((n,) + shape, np.float32))


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize("offset,fmt,value,field", [
    (0, "<4s", b"XCDX", "magic"), (4, "<H", 2, "version"), (6, "<B", 2, "kind"),
    (7, "<B", 9, "dtype"), (8, "<B", 7, "compression"), (9, "<B", 3, "ndim"),
    (10, "<H", 1, "reserved"), (44, "<I", 0, "count"), (44, "<I", 3, "shape"),
])
def test_each_header_field_is_checked(offset, fmt, value, field):
    with pytest.raises(WireError) as e:
        wire.decode(_patch(_msg(), offset, fmt, value), wire.FEATURES, MID, (3, 2, 2))
    assert e.value.field == field


def test_shape_model_payload_and_values_are_checked():
    data = _msg()
    with pytest.raises(WireError, match="shape") as e:
        wire.decode(data, wire.FEATURES, MID, (3, 4, 4))
    assert e.value.field == "shape"
    with pytest.raises(WireError) as e:
        wire.decode(data, wire.FEATURES, "cd" * 32, (3, 2, 2))
    assert e.value.field == "model_id"
    with pytest.raises(WireError) as e:
        wire.decode(data[:-4], wire.FEATURES, MID, (3, 2, 2))
    assert e.value.field == "payload_length"
    with pytest.raises(WireError) as e:
        wire.decode(data[:20], wire.FEATURES)
    assert e.value.field == "header"
    nan = wire.encode(wire.FEATURES, MID, [0], np.full((1, 3, 2, 2), np.nan, np.float32))
    with pytest.raises(WireError, match="NaN"):
        wire.decode(nan, wire.FEATURES, MID)
    # a zlib bomb: the stream would decode to far more than the shape says
    head = _msg(1)[:48 + 8 + 16]
    bomb = zlib.compress(b"\0" * (1 << 20))
    data = _patch(head, 8, "<B", 1) + struct.pack("<Q", len(bomb)) + bomb
    with pytest.raises(WireError, match="zlib"):
        wire.decode(data, wire.FEATURES, MID)
    with pytest.raises(WireError, match="count"):
        wire.decode(_msg(3), wire.FEATURES, MID, max_samples=2)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_damage_gives_wire_error_or_a_valid_message(data):
    msg = bytearray(wire.encode(wire.FEATURES, MID, [1, 2], np.ones((2, 2, 3, 3), np.float32),
                                compression=data.draw(st.sampled_from(["none", "zlib"]))))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(msg) - 1))
        msg[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(msg)))
    try:
        m = wire.decode(bytes(msg[:cut]), wire.FEATURES)
    except WireError:
        return
    assert m.array.dtype == np.float32 and len(m.ids) == len(m.array)
