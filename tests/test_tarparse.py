"""The lean tar parser against archives written by tarfile in every format, GNU tar and compressors."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards import tarparse
from shards.tario import TarShardReader, TarShardWriter, iter_tar

LONG_DIR = "d" * 120  # forces a ustar prefix, a GNU long name or a PAX path, depending on the format


def _tar_bytes(fmt: int, members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        dir_info = tarfile.TarInfo("adir")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(data: bytes) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    headers: dict[str, str] = {}
    got = list(tarparse.iter_members(tarparse.open_stream(io.BytesIO(data)), headers))
    return got, headers


MEMBERS = {"000001.jpg": b"\xff\xd8" + bytes(700), "000001.txt": "a café".encode(),
           f"{LONG_DIR}/000002.boxes.npy": bytes(range(256)) * 3, "000002.json": b"{}"}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_parser_reads_every_format_and_compression(fmt, mode):
    got, _ = _members(_tar_bytes(fmt, MEMBERS, mode))
    assert got == list(MEMBERS.items())  # directories are skipped, names and bytes exact


def test_pax_global_header_and_gnu_tar(tmp_path):
    uri = str(tmp_path / "00000.tar")
    with TarShardWriter(uri, pax_headers={"sga.labelset": '{"id": "abc"}'}) as w:
        w.write("k1", {"labels.json": b"{}"})
    reader = TarShardReader(uri)
    assert [s.key for s in reader] == ["k1"]
    assert reader.pax_headers == {"sga.labelset": '{"id": "abc"}'}
    # An archive made by GNU tar itself.
    src = tmp_path / "src"
    src.mkdir()
    (src / "000007.txt").write_text("seven")
    (src / "000007.json").write_text("{}")
    subprocess.run(["tar", "-cf", str(tmp_path / "gnu.tar"), "-C", str(src), "000007.json", "000007.txt"],
                   check=True)
    (sample,) = list(iter_tar(str(tmp_path / "gnu.tar")))
    assert sample.key == "000007" and sample.members == {"json": b"{}", "txt": b"seven"}


def test_parser_rejects_bad_checksum_and_missing_end():
    data = bytearray(_tar_bytes(tarfile.PAX_FORMAT, MEMBERS))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        last = tar.getmembers()[-1]
        first_file = tar.getmember("000001.jpg")
    end_of_members = last.offset_data + -(-last.size // 512) * 512
    with pytest.raises(tarparse.TarFormatError, match="without its end-of-archive block"):
        _members(bytes(data[:end_of_members]))          # cut exactly between the last member and the end
    assert len(_members(bytes(data[:end_of_members + 512]))[0]) == len(MEMBERS)  # one zero block ends it
    data[first_file.offset + 10] ^= 0x01  # a bit flip inside a header's name field
    with pytest.raises(tarparse.TarFormatError, match="checksum"):
        _members(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1500))
def test_byte_sum_is_the_exact_sum_of_the_bytes(data):
    assert tarparse.byte_sum(data) == sum(data)
    assert tarparse.byte_sum(b"\xff" * 512) == 255 * 512          # the largest header sum, no reduction
