"""The overlay file handle format (overlay-format.md §4)."""
import os

import pytest

from ovlfsck import handles
from ovlfsck.handles import HandleError, OvlFh, UnknownHandle, decode, decode_index_name

# A real origin from the experiment log (A1): ext4, ino 12.
A1 = bytes.fromhex("00fb1d00010c3664b7ffbf408182dd84ed33ee52e00c0000003d3553a2")


def test_decode_real_handle():
    fh = decode(A1)
    assert fh.fid_type == 1 and fh.flags == 0
    assert fh.uuid.hex() == "0c3664b7ffbf408182dd84ed33ee52e0"
    assert handles.describe_fid(fh).startswith("ino 12 ")
    assert fh.encode() == A1
    assert fh.index_name() == A1.hex()


def test_trailing_bytes_are_tolerated_like_the_kernel():
    assert decode(A1 + b"junk").encode() == A1


@pytest.mark.parametrize("raw", [b"", b"garbage", A1[:20], bytes([0, 0xfa]) + A1[2:], A1[:2] + bytes([40]) + A1[3:]])
def test_invalid_handles(raw):
    with pytest.raises(HandleError):
        decode(raw)


@pytest.mark.parametrize("raw", [bytes([1]) + A1[1:], A1[:3] + bytes([0x08]) + A1[4:], A1[:3] + bytes([0x01]) + A1[4:]])
def test_unknown_version_flags_or_endianness(raw):
    with pytest.raises(UnknownHandle):
        decode(raw)


def test_any_endian_flag_is_accepted():
    assert decode(A1[:3] + bytes([0x02]) + A1[4:]).flags == 2


@pytest.mark.parametrize("name", ["deadbeef", "zz" * 30, A1.hex()[:-1], "00fa" + A1.hex()[4:]])
def test_bad_index_names(name):
    with pytest.raises(HandleError):
        decode_index_name(name)


def test_name_to_handle_matches_a_second_encoding(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    t1 = handles.name_to_handle(str(f))
    t2 = handles.name_to_handle(str(f))
    assert t1 == t2 and len(t1[1]) > 0
    os.link(f, tmp_path / "g")
    assert handles.name_to_handle(str(tmp_path / "g")) == t1
    (tmp_path / "h").write_text("y")
    assert handles.name_to_handle(str(tmp_path / "h")) != t1


def test_name_to_handle_does_not_follow_symlinks(tmp_path):
    (tmp_path / "target").write_text("x")
    os.symlink("target", tmp_path / "link")
    assert handles.name_to_handle(str(tmp_path / "link")) != handles.name_to_handle(str(tmp_path / "target"))


def test_fs_uuid_is_16_bytes_or_none(tmp_path):
    uuid = handles.fs_uuid(str(tmp_path))
    assert uuid is None or len(uuid) == 16


def test_same_object_ignores_flags():
    a = OvlFh(0, 1, b"u" * 16, b"fid")
    assert a.same_object(OvlFh(handles.FLAG_PATH_UPPER, 1, b"u" * 16, b"fid"))
    assert not a.same_object(OvlFh(0, 1, b"v" * 16, b"fid"))
