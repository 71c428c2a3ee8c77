"""Binary record readers: round trips, zero-copy views, and every error kind."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from xnorcdl.records import RECORD_FORMATS, DataError, pack_records, read_records

RS = {"cifar10": 3073, "cifar100": 3074, "raw": 3072}


def manual_bytes(images, label_rows):
    """Records built by hand: label bytes, then the R, G, B planes row-major."""
    out = bytearray()
    for img, lab in zip(images, label_rows):
        out += bytes(lab)
        for c in range(3):
            out += img[c].tobytes(order="C")
    return bytes(out)


def random_case(fmt, n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    counts = [k for _, k in RECORD_FORMATS[fmt].labels]
    rows = [[int(rng.integers(0, k)) for k in counts] for _ in range(n)]
    return images, rows


def write(tmp_path, data, name="r.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_record_sizes():
    assert {f: RECORD_FORMATS[f].record_size for f in RECORD_FORMATS} == RS


@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(sorted(RECORD_FORMATS)), n=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_round_trip_against_hand_built_records(tmp_path_factory, fmt, n, seed):
    images, rows = random_case(fmt, n, seed)
    path = write(tmp_path_factory.mktemp("rt"), manual_bytes(images, rows))
    got, labels = read_records(path, fmt)
    np.testing.assert_array_equal(got, images)
    if fmt == "raw":
        assert labels is None
    else:
        assert labels.dtype == np.int64 and labels.shape == (n,)
        assert labels.tolist() == [r[-1] for r in rows]  # fine label for cifar100


@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(sorted(RECORD_FORMATS)), n=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_pack_records_matches_hand_built(fmt, n, seed):
    images, rows = random_case(fmt, n, seed)
    width = RECORD_FORMATS[fmt].label_bytes
    labels = None if fmt == "raw" else np.array(rows, dtype=np.int64).reshape(n, width)
    packed = pack_records(images, labels, fmt)
    assert packed.shape == (n, RS[fmt])
    assert packed.tobytes() == manual_bytes(images, rows)


def test_images_are_a_read_only_view_of_the_bytes_read(tmp_path):
    images, rows = random_case("cifar10", 4, 1)
    path = write(tmp_path, manual_bytes(images, rows))
    got, _ = read_records(path)  # cifar10 is the default
    assert not isinstance(got, np.memmap)  # read into memory: a file cut short cannot SIGBUS
    assert got.shape == (4, 3, 32, 32) and got.dtype == np.uint8
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0, 0, 0, 0] = 1
    # a view of the bytes read: pixel (c, y, x) of record i sits at i*3073 + 1 + c*1024 + y*32 + x
    assert got.strides == (3073, 1024, 32, 1)


def test_default_format_is_cifar10(tmp_path):
    images, rows = random_case("cifar10", 2, 2)
    path = write(tmp_path, manual_bytes(images, rows))
    a, la = read_records(path)
    b, lb = read_records(path, "cifar10")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_accepts_pathlike(tmp_path):
    images, rows = random_case("raw", 1, 3)
    path = tmp_path / "x.bin"
    path.write_bytes(manual_bytes(images, rows))
    np.testing.assert_array_equal(read_records(path, "raw")[0], images)


@pytest.mark.parametrize("fmt", sorted(RECORD_FORMATS))
def test_truncated_file(tmp_path, fmt):
    images, rows = random_case(fmt, 3, 4)
    data = manual_bytes(images, rows)[:-10]
    path = write(tmp_path, data)
    with pytest.raises(DataError) as e:
        read_records(path, fmt)
    msg = str(e.value)
    rs = RS[fmt]
    assert path in msg and str(len(data)) in msg and f"record size {rs}" in msg
    assert f"record 2 starts at byte offset {2 * rs}" in msg


@pytest.mark.parametrize("extra", [1, 2, 5])
def test_oversized_by_a_few_bytes(tmp_path, extra):
    images, rows = random_case("cifar10", 2, 5)
    data = manual_bytes(images, rows) + b"\0" * extra
    path = write(tmp_path, data)
    with pytest.raises(DataError, match=rf"size {len(data)} bytes .* record size 3073; "
                                        rf"the incomplete record 2 starts at byte offset 6146"):
        read_records(path)


def test_cifar10_file_read_as_cifar100_is_refused_by_size(tmp_path):
    images, rows = random_case("cifar10", 3, 6)
    path = write(tmp_path, manual_bytes(images, rows))
    with pytest.raises(DataError, match="cifar100 record size 3074"):
        read_records(path, "cifar100")


def test_empty_file(tmp_path):
    path = write(tmp_path, b"")
    with pytest.raises(DataError, match=r"r\.bin: file is empty.*3073 bytes"):
        read_records(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.bin: no such file") as e:
        read_records(str(tmp_path / "nope.bin"))
    assert e.value.where == str(tmp_path / "nope.bin")
    with pytest.raises(DataError, match="is a folder"):
        read_records(str(tmp_path))


def test_unknown_format_lists_known_ones(tmp_path):
    path = write(tmp_path, b"\0" * 3073)
    with pytest.raises(DataError, match=r"unknown record format 'cifar11'.*cifar10, cifar100, raw"):
        read_records(path, "cifar11")


def test_bad_cifar10_label(tmp_path):
    images, rows = random_case("cifar10", 5, 7)
    rows[3] = [10]
    path = write(tmp_path, manual_bytes(images, rows))
    with pytest.raises(DataError) as e:
        read_records(path)
    msg = str(e.value)
    assert path in msg
    assert f"record 3 (byte offset {3 * 3073})" in msg
    assert "label is 10, expected 0..9 for cifar10" in msg


@pytest.mark.parametrize("field,pos,value,allowed", [("coarse", 0, 20, "0..19"),
                                                     ("fine", 1, 100, "0..99"),
                                                     ("fine", 1, 255, "0..99")])
def test_bad_cifar100_labels(tmp_path, field, pos, value, allowed):
    images, rows = random_case("cifar100", 4, 8)
    rows[1][pos] = value
    path = write(tmp_path, manual_bytes(images, rows))
    with pytest.raises(DataError) as e:
        read_records(path, "cifar100")
    msg = str(e.value)
    assert path in msg and "record 1 (byte offset 3074)" in msg
    assert f"{field} label is {value}, expected {allowed} for cifar100" in msg


def test_raw_has_no_labels_and_any_byte_values(tmp_path):
    images = np.full((2, 3, 32, 32), 255, dtype=np.uint8)
    path = write(tmp_path, images.tobytes())
    got, labels = read_records(path, "raw")
    assert labels is None and got.shape == (2, 3, 32, 32) and int(got.min()) == 255


def test_pack_records_refuses_bad_input():
    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    with pytest.raises(DataError, match="0..9"):
        pack_records(images, [0, 10])
    with pytest.raises(DataError, match="needs labels"):
        pack_records(images, None, "cifar10")
    with pytest.raises(DataError, match="expected 2 x 2 values"):
        pack_records(images, [1, 2], "cifar100")
    with pytest.raises(DataError, match="uint8"):
        pack_records(images.astype(np.float32), [0, 1])
