"""A minimal, strict zip reader over mmap: the central directory and where each member's bytes are.

torch archives store members uncompressed and aligned, so a member is just a byte range of the
file. We parse the directory ourselves (instead of `zipfile`) to see duplicates, overlaps and
compression, to stay fast on 100k-member archives, and to never read a member we do not need.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptCheckpointError

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
# The same 46 bytes, only the fields we use: signature, flags, method, crc, compressed and
# uncompressed size, name/extra/comment lengths, local header offset.
_CENTRAL_FIELDS = struct.Struct("<4s4x2H4x3L3H8xL")
_LOCAL = struct.Struct("<4s5H3L2H")
_LOCAL_HEAD = struct.Struct("<4s22x2H")  # signature; name and extra lengths at offset 26
_MAX_COMMENT = 0xFFFF
STORED, DEFLATED = 0, 8
STORAGE_ALIGNMENT = 64  # torch.save aligns every member's data to this
SPARSE_MEMBER_BYTES = 64 << 10  # average member size above which local headers are pread
# torch writes every member stored; a deflated one is unusual, and a 130 KB deflated data.pkl
# inflated to 1.2 GB of RSS. What a file's members may inflate to, all reads together, is capped
# at the file's own size (and MIN_INFLATE_BUDGET): no worse than the same members stored. The
# cap holds against what the stream produces, not what the directory (or a zip64 field) claims.
MIN_INFLATE_BUDGET = 8 << 20
INFLATE_CHUNK = 1 << 20  # output per zlib call: memory while streaming is bounded by this
_INPUT_CHUNK = 1 << 20


class InflateBudgetError(CorruptCheckpointError):
    """A deflated member would inflate past what the file may (ZipArchive.inflate_budget)."""


@dataclass(slots=True)
class ZipEntry:
    name: str
    header_offset: int
    method: int
    compressed_size: int
    size: int
    crc: int
    flags: int
    raw_name: bytes = b""  # as stored, to match the local header byte for byte
    data_start: int | None = None  # first data byte, when the local header checked out in the map


class ZipArchive:
    """Read-only view of a zip file. `buffer` is the mmap; members are byte ranges of it."""

    def __init__(self, path: Path, buffer: mmap.mmap | bytes | None = None):
        self.path = path if hasattr(path, "url") else Path(path)  # a RemotePath stays a URL
        self._own = buffer is None
        # A remote buffer (sources.SourceBuffer) fetches what it is sliced for: read the tail and
        # the directory as two ranges, never local headers one by one (see predicted_offset).
        self.remote = buffer is not None and not isinstance(buffer, (mmap.mmap, bytes, bytearray, memoryview))
        self._file = None
        if buffer is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed in close())
            try:
                buffer = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except BaseException:
                self._file.close()
                raise
        self.buffer = buffer
        self.size = len(buffer)
        self.entries: dict[str, ZipEntry] = {}
        self.duplicates: list[str] = []
        self.shadowed: list[ZipEntry] = []  # earlier entries of a repeated name (readers differ
        # on which copy they take: torch's reader may load one we would not show)
        self._pread = False
        self.multidisk = False  # the end record names other disks: torch.load refuses the file
        self.flag_bits = 0  # every member's general-purpose flags, or-ed (refusals check them)
        self.odd_methods = False  # some member is neither stored nor deflated
        self.inflate_budget = max(MIN_INFLATE_BUDGET, self.size)
        self.inflated = 0  # bytes inflated so far, by read()
        self.deflated_read: list[str] = []  # deflated members read() inflated
        try:
            self._parse_directory()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._own and isinstance(self.buffer, mmap.mmap):
            self.buffer.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ZipArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"corrupt zip archive: {what}", self.path, "the file is truncated or damaged; re-download or re-save it"
        )

    def _parse_directory(self) -> None:
        buf, size = self.buffer, self.size
        tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
        tail = bytes(buf[tail_start:size])  # works for mmap, bytes, memoryview and remote buffers
        pos = tail.rfind(b"PK\x05\x06")
        while pos >= 0 and tail_start + pos + _EOCD.size > size:  # a signature cut off by truncation
            pos = tail.rfind(b"PK\x05\x06", 0, pos)
        if pos >= 0:
            pos += tail_start
        if pos < 0:
            raise self._corrupt("end-of-central-directory record not found")
        _, disk, cd_disk, on_disk, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos - tail_start)
        locator = pos - _EOCD64_LOCATOR.size
        if locator >= 0 and buf[locator : locator + 4] == b"PK\x06\x07":
            _, _, eocd64_offset, _ = _EOCD64_LOCATOR.unpack_from(bytes(buf[locator : locator + _EOCD64_LOCATOR.size]))
            record = bytes(buf[eocd64_offset : eocd64_offset + _EOCD64.size]) if eocd64_offset + _EOCD64.size <= size else b""
            if record[:4] != b"PK\x06\x06":
                raise self._corrupt("bad zip64 end record")
            fields = _EOCD64.unpack_from(record)
            disk, cd_disk, on_disk = fields[4], fields[5], fields[6]
            count, cd_size, cd_offset = fields[7], fields[8], fields[9]
        # torch's reader (miniz) refuses split archives; we read the one directory we find
        self.multidisk = disk != 0 or cd_disk != 0 or on_disk != count
        if cd_offset + cd_size > size or count * _CENTRAL.size > cd_size:
            raise self._corrupt("central directory lies outside the file")
        entries = self.entries
        p = cd_offset
        end = cd_offset + cd_size
        # Directory bytes at `p` are cd[p - base]: the map itself locally, one fetched range remotely.
        cd, base = (buf, 0) if not self.remote else (buf[cd_offset:end], cd_offset)
        unpack = _CENTRAL_FIELDS.unpack_from
        local_head = _LOCAL_HEAD.unpack_from
        # Local headers of large members are read with pread, not through the map: touching the
        # map there maps the whole page-cache folio around each header (the RSS of a 1.4 GB
        # full-module checkpoint went from 16 MB to 190 MB). For archives of many small members
        # the headers are checked here, in the directory loop, through the map: 100k separate
        # lookups later cost 0.2 s, and those pages are mapped anyway.
        self._pread = self._file is not None and size > SPARSE_MEMBER_BYTES * max(1, count)
        check_local = not self._pread and not self.remote
        for _ in range(count):
            if p + _CENTRAL.size > end:
                raise self._corrupt("central directory is truncated")
            q = p - base
            (sig, flags, method, crc, csize, usize, nlen, xlen, clen, offset) = unpack(cd, q)
            if sig != b"PK\x01\x02":
                raise self._corrupt("bad central directory entry")
            self.flag_bits |= flags
            if method != 0 and method != 8:
                self.odd_methods = True
            if cd[q + 34 : q + 36] != b"\0\0":  # the entry's disk number: another disk
                self.multidisk = True
            name_start = p + _CENTRAL.size
            raw_name = bytes(cd[name_start - base : name_start - base + nlen])
            name = raw_name.decode("utf-8", "replace")
            if csize == 0xFFFFFFFF or usize == 0xFFFFFFFF or offset == 0xFFFFFFFF:
                usize, csize, offset = self._zip64_extra(cd, name_start + nlen - base, xlen, usize, csize, offset)
            p = name_start + nlen + xlen + clen
            start = None
            if check_local:  # a mismatch is left for data_offset() to word, if anyone asks
                try:
                    signature, local_nlen, local_xlen = local_head(buf, offset)
                except struct.error:
                    signature = None
                if signature == b"PK\x03\x04" and local_nlen == nlen and buf[offset + 30 : offset + 30 + nlen] == raw_name:
                    start = offset + 30 + nlen + local_xlen
                    if start + csize > size:
                        start = None
            if name in entries:
                self.duplicates.append(name)
                self.shadowed.append(entries[name])
            entries[name] = ZipEntry(name, offset, method, csize, usize, crc, flags, raw_name, start)
        if p > end:
            raise self._corrupt("central directory is truncated")

    def _zip64_extra(self, buf, start: int, length: int, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
        p, end = start, min(start + length, len(buf))
        while p + 4 <= end:
            tag, size = struct.unpack_from("<2H", buf, p)
            if p + 4 + size > end:
                break
            if tag == 1:
                q = p + 4
                values = []
                for wanted in (usize, csize, offset):
                    if wanted == 0xFFFFFFFF:
                        if q + 8 > p + 4 + size:
                            raise self._corrupt("bad zip64 extra field")
                        values.append(struct.unpack_from("<Q", buf, q)[0])
                        q += 8
                    else:
                        values.append(wanted)
                return values[0], values[1], values[2]
            p += 4 + size
        raise self._corrupt("zip64 sizes missing")

    # -- members -------------------------------------------------------------------------------
    def data_offset(self, entry: ZipEntry) -> int:
        """Absolute offset of the member's first byte (after its local header)."""
        if entry.data_start is not None:
            return entry.data_start
        pos = entry.header_offset
        if self._pread and self._file is not None:
            buf = os.pread(self._file.fileno(), _LOCAL.size + len(entry.raw_name), pos)
            base = 0
        elif self.remote:
            buf, base = self.buffer[pos : pos + _LOCAL.size + len(entry.raw_name)], 0
        else:
            buf, base = self.buffer, pos
        try:
            signature, name_len, extra_len = _LOCAL_HEAD.unpack_from(buf, base)
        except struct.error:
            signature = None
        if signature != b"PK\x03\x04":
            raise self._corrupt(f"local header of {entry.name!r} is missing")
        local_name = buf[base + _LOCAL.size : base + _LOCAL.size + name_len]
        if local_name != entry.raw_name:
            # Two directory entries sharing one local header (overlapping members, the
            # non-recursive zip bomb) or a directory that disagrees with the data.
            raise self._corrupt(f"directory entry {entry.name!r} points at the local header of {bytes(local_name[:80])!r}")
        start = pos + _LOCAL.size + name_len + extra_len
        if start + entry.compressed_size > self.size:
            raise self._corrupt(f"member {entry.name!r} runs past the end of the file")
        return start

    def predicted_offset(self, entry: ZipEntry) -> int:
        """Where torch's writer (PyTorchStreamWriter) puts a member's first byte: after the local
        header, the name, a 4-byte "FB" padding field (and zip64 fields for huge members), rounded
        up to the 64-byte storage alignment. A remote archive uses it instead of one request per
        local header; TensorData checks the real header where the bytes are read."""
        start = entry.header_offset + _LOCAL.size + len(entry.raw_name) + 4
        if entry.size >= 0xFFFFFFFF or entry.header_offset >= 0xFFFFFFFF:
            start += 4 + (16 if entry.size >= 0xFFFFFFFF else 0) + (8 if entry.header_offset >= 0xFFFFFFFF else 0)
        return -(-start // STORAGE_ALIGNMENT) * STORAGE_ALIGNMENT

    def locate_remote(self, entries: list[ZipEntry]) -> bool:
        """Remote archives: True when members sit where torch's writer puts them (checked on
        one member whose local header is read anyway), so predicted_offset stands in for their
        headers. Otherwise every local header is fetched, concurrently, and False returned."""
        prefix_pkl = [e for e in self.entries.values() if e.name.endswith("data.pkl")]
        probe = prefix_pkl[0] if prefix_pkl else (entries[0] if entries else None)
        if probe is None or self.data_offset(probe) == self.predicted_offset(probe):
            return True
        source = self.buffer.source
        ranges = [(e.header_offset, min(_LOCAL.size + len(e.raw_name), self.size - e.header_offset)) for e in entries]
        for entry, head in zip(entries, source.read_ranges(ranges)):
            try:
                signature, name_len, extra_len = _LOCAL_HEAD.unpack_from(head)
            except struct.error:
                continue
            start = entry.header_offset + _LOCAL.size + name_len + extra_len
            if signature == b"PK\x03\x04" and head[_LOCAL.size :] == entry.raw_name and start + entry.compressed_size <= self.size:
                entry.data_start = start
        return False

    def loose_bytes(self, entry: ZipEntry, limit: int) -> bytes | None:
        """A member's bytes the way a lenient reader (torch's, joblib's) finds them: from its
        local header, whatever name that header gives and whatever the flag bits say; inflated
        up to `limit`. None when there is no local header or the data is unreadable. For
        scanning pickles an attacker placed outside the checkpoint's layout, never for tensors."""
        pos = entry.header_offset
        if pos < 0 or pos + _LOCAL.size > self.size:
            return None
        signature, name_len, extra_len = _LOCAL_HEAD.unpack_from(bytes(self.buffer[pos : pos + _LOCAL.size]))
        if signature != b"PK\x03\x04":
            return None
        start = pos + _LOCAL.size + name_len + extra_len
        size = min(entry.compressed_size, self.size - start)
        if size <= 0:
            return b""
        if entry.method == STORED:
            return bytes(self.buffer[start : start + min(size, limit)])
        if entry.method == DEFLATED and self.remote:
            try:
                return zlib.decompressobj(-15).decompress(self.buffer[start : start + size], limit)
            except zlib.error:
                return None
        if entry.method == DEFLATED:
            with memoryview(self.buffer) as view:  # no copy of a large compressed member
                try:
                    return zlib.decompressobj(-15).decompress(view[start : start + size], limit)
                except zlib.error:
                    return None
        return None

    def read(self, name: str, limit: int, verify: bool = False) -> bytes:
        """The member's bytes, refusing members larger than `limit`. A deflated member is
        inflated in chunks, charged to the file's inflate_budget, and refused as soon as the
        stream produces more than the directory declares (so a zip bomb inflates no further).
        verify: also check the CRC (cheap for small members such as data.pkl)."""
        entry = self.entries.get(name)
        if entry is None:
            raise self._corrupt(f"member {name!r} is missing")
        if entry.size > limit:
            raise self._corrupt(f"member {name!r} is {entry.size:,} bytes, more than the {limit:,} allowed")
        if entry.method == STORED:
            start = self.data_offset(entry)
            if entry.compressed_size != entry.size:
                raise self._corrupt(f"member {name!r} has inconsistent sizes")
            out = bytes(self.buffer[start : start + entry.size])
        elif entry.method == DEFLATED:
            left = self.inflate_budget - self.inflated
            if entry.size > left:
                raise InflateBudgetError(
                    f"deflated member {name!r} declares {entry.size:,} bytes, past what this file's members may "
                    f"inflate to ({self.inflate_budget:,} bytes; {left:,} left)", self.path,
                    "torch stores members uncompressed; re-save the file with torch.save",
                )  # fmt: skip
            parts = []
            try:
                for part in self.inflate(entry, entry.size):
                    parts.append(part)
            finally:
                self.inflated += sum(len(p) for p in parts)
            out = b"".join(parts)
            if len(out) != entry.size:
                raise self._corrupt(f"member {name!r} does not inflate to its declared {entry.size:,} bytes")
            self.deflated_read.append(name)
        else:
            raise self._corrupt(f"member {name!r} uses unsupported compression method {entry.method}")
        if verify and zlib.crc32(out) & 0xFFFFFFFF != entry.crc:
            raise self._corrupt(f"member {name!r} fails its CRC check")
        return out

    def inflate(self, entry: ZipEntry, cap: int) -> Iterator[bytes]:
        """The inflated bytes of a deflated member in chunks of at most INFLATE_CHUNK, compressed
        input fed from the map in chunks too. Raises CorruptCheckpointError once the stream
        produces more than `cap` bytes (whatever the directory says) or ends early or badly."""
        start = self.data_offset(entry)
        pos, end = start, start + entry.compressed_size
        d = zlib.decompressobj(-15)
        produced = 0
        try:
            while not d.eof:
                if d.unconsumed_tail:
                    data = d.unconsumed_tail
                elif pos < end:
                    data = self.buffer[pos : min(pos + _INPUT_CHUNK, end)]
                    pos += len(data)
                else:
                    data = b""
                out = d.decompress(data, min(INFLATE_CHUNK, cap - produced + 1))
                if not out and not data:
                    break  # input exhausted and nothing pending: the stream is cut short
                produced += len(out)
                if produced > cap:
                    raise self._corrupt(f"member {entry.name!r} inflates past its declared size ({cap:,} bytes)")
                if out:
                    yield out
        except zlib.error as exc:
            raise self._corrupt(f"member {entry.name!r} does not inflate ({exc})") from exc
        if not d.eof:
            raise self._corrupt(f"member {entry.name!r} ends before its deflate stream does")

    def crc_ok(self, entry: ZipEntry, block: int = 16 << 20) -> bool:
        """CRC-32 of a member against its directory entry, streamed: stored members a block of
        the map at a time, deflated ones a chunk of output at a time (never more than the
        declared size is inflated: a stream producing more is a mismatch)."""
        crc = 0
        if entry.method == STORED:
            start = self.data_offset(entry)
            stop = start + entry.compressed_size
            for pos in range(start, stop, block):
                crc = zlib.crc32(self.buffer[pos : min(pos + block, stop)], crc)
            return crc & 0xFFFFFFFF == entry.crc
        if entry.method != DEFLATED:
            raise self._corrupt(f"member {entry.name!r} uses unsupported compression method {entry.method}")
        size = 0
        for part in self.inflate(entry, entry.size):
            crc = zlib.crc32(part, crc)
            size += len(part)
        if size != entry.size:
            raise self._corrupt(f"member {entry.name!r} does not inflate to its declared {entry.size:,} bytes")
        return crc & 0xFFFFFFFF == entry.crc

    def check_crc(self, name: str) -> bool:
        entry = self.entries.get(name)
        if entry is None:
            raise self._corrupt(f"member {name!r} is missing")
        return self.crc_ok(entry)
