"""A zip written the way torch's PyTorchStreamWriter (miniz) writes it, so `torch.load` (and
its mmap path) reads what mscope writes exactly as it reads torch's own files."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from ..readers.ziparchive import STORED
from .atomic import SaveError, copy_range

# The zip records (little-endian, APPNOTE 4.3): requires_grad.py finds the central directory
# entry of data.pkl with the same layouts.
LOCAL = struct.Struct("<4s5H3L2H")
CENTRAL = struct.Struct("<4s6H3L5H2L")
_DESCRIPTOR32 = struct.Struct("<4s3L")
_DESCRIPTOR64 = struct.Struct("<4sL2Q")
EOCD = struct.Struct("<4s4H2LH")
EOCD64 = struct.Struct("<4sQ2H2L4Q")
EOCD64_LOCATOR = struct.Struct("<4sLQL")
FLAG_DESCRIPTOR, FLAG_UTF8 = 0x0008, 0x0800  # general purpose flags: data descriptor, UTF-8 name
# Sizes and offsets at or past this go to zip64 extra fields (a module constant so tests can
# exercise the zip64 layout with small files).
ZIP64_LIMIT = 0xFFFFFFFF
DEFAULT_ALIGNMENT = 64


@dataclass(slots=True)
class _Written:
    name: bytes
    offset: int
    method: int
    crc: int
    compressed_size: int
    size: int
    flags: int


class TorchZipWriter:
    """Members as torch writes them: local headers with zeroed sizes and a data descriptor,
    the payload aligned to `alignment` bytes by an `FB` extra field padded with `Z`, zip64 extra
    fields only where a size or offset needs them, and always a zip64 end record."""

    def __init__(self, fh: BinaryIO, alignment: int = DEFAULT_ALIGNMENT):
        self.fh = fh
        self.alignment = alignment
        self.pos = 0
        self.members: list[_Written] = []
        self._open: _Written | None = None
        self._crc = 0
        self._count = 0

    def _out(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.pos += len(data)

    def begin(
        self, name: str, compressed_size: int, size: int | None = None, method: int = STORED
    ) -> None:
        size = compressed_size if size is None else size
        raw_name = name.encode("utf-8")
        offset = self.pos
        big = max(size, compressed_size) >= ZIP64_LIMIT
        fields = ([size, compressed_size] if big else []) + (
            [offset] if offset >= ZIP64_LIMIT else []
        )
        zip64 = struct.pack(f"<2H{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        start = offset + LOCAL.size + len(raw_name) + len(zip64) + 4
        pad = -start % self.alignment
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = FLAG_UTF8 | (FLAG_DESCRIPTOR if compressed_size else 0)
        header = LOCAL.pack(
            b"PK\x03\x04", 0, flags, method, 0, 0, 0, 0, 0, len(raw_name), len(extra)
        )
        self._out(header + raw_name + extra)
        self._open = _Written(raw_name, offset, method, 0, compressed_size, size, flags)
        self._crc = 0
        self._count = 0

    def write(self, data: bytes | memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._count += len(data)
        self._out(data)

    def copy(self, src_fd: int, offset: int, length: int) -> None:
        """Append bytes of another file (kernel copy where it can); their CRC is the caller's."""
        self.fh.flush()
        copy_range(src_fd, self.fh.fileno(), offset, length)
        self._count += length
        self.pos += length

    def end(self, crc: int | None = None) -> None:
        member = self._open
        assert member is not None
        if self._count != member.compressed_size:
            raise SaveError(
                f"member {member.name.decode()!r} came out {self._count:,} bytes, not {member.compressed_size:,}"
            )
        member.crc = self._crc if crc is None else crc
        if member.flags & FLAG_DESCRIPTOR:
            if (
                member.offset >= ZIP64_LIMIT
                or max(member.size, member.compressed_size) >= ZIP64_LIMIT
            ):
                self._out(
                    _DESCRIPTOR64.pack(
                        b"PK\x07\x08", member.crc, member.compressed_size, member.size
                    )
                )
            else:
                self._out(
                    _DESCRIPTOR32.pack(
                        b"PK\x07\x08", member.crc, member.compressed_size, member.size
                    )
                )
        self.members.append(member)
        self._open = None

    def add(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def finish(self, order: Iterable[str] | None = None) -> None:
        """The central directory (in `order` of names when given) and the end records."""
        members = self.members
        if order is not None:
            by_name = {m.name.decode("utf-8"): m for m in members}
            members = [by_name[n] for n in order]
        cd_offset = self.pos
        for m in members:
            big = max(m.size, m.compressed_size) >= ZIP64_LIMIT
            far = m.offset >= ZIP64_LIMIT
            fields = ([m.size, m.compressed_size] if big else []) + ([m.offset] if far else [])
            extra = (
                struct.pack(f"<2H{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            )
            self._out(
                CENTRAL.pack(
                    b"PK\x01\x02",
                    0,
                    0,
                    m.flags,
                    m.method,
                    0,
                    0,
                    m.crc,
                    0xFFFFFFFF if big else m.compressed_size,
                    0xFFFFFFFF if big else m.size,
                    len(m.name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    0xFFFFFFFF if far else m.offset,
                )  # fmt: skip
                + m.name
                + extra
            )
        cd_size = self.pos - cd_offset
        count = len(members)
        eocd64_offset = self.pos
        self._out(
            EOCD64.pack(b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, count, count, cd_size, cd_offset)
        )
        self._out(EOCD64_LOCATOR.pack(b"PK\x06\x07", 0, eocd64_offset, 1))
        small = count < 0xFFFF
        self._out(
            EOCD.pack(
                b"PK\x05\x06",
                0,
                0,
                count if small else 0xFFFF,
                count if small else 0xFFFF,
                cd_size if cd_size < ZIP64_LIMIT else 0xFFFFFFFF,
                cd_offset if cd_offset < ZIP64_LIMIT else 0xFFFFFFFF,
                0,
            )  # fmt: skip
        )
