"""A strict reader for the tar files `prepare` writes, with the standard library's tarfile for anything else.

Members are named the way webdataset names them (sample key, lower-case suffix), consecutive members with one key
make a sample, and only ids members' bytes are ever loaded: any other member is skipped unread.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import zlib
from collections.abc import Generator, Iterator
from typing import IO

# webdataset's metadata members (`__key__`-style names), which are not part of any sample.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
# The members whose bytes are loaded; every other member is skipped past.
ID_SUFFIXES = ("ids.u16", "ids.i32")
# webdataset's split of a member name into sample key and suffix: everything up to the first dot of the last
# path component, and the rest.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

# One tar member as the reader sees it: (sample key, lower-case suffix, bytes for an ids member, None for any other).
_Member = tuple[str, str, bytes | None]
# One sample: its key and its members as (suffix, bytes or None).
Group = tuple[str, list[tuple[str, bytes | None]]]

_BLOCK = 512  # tar headers and member data come in blocks of this size
_ZERO_BLOCK = bytes(_BLOCK)  # the end-of-archive marker
_READ_SIZE = 1 << 20  # bytes per read from a shard: a few reads per shard, not one per member
_REGULAR_TYPES = (b"0", b"\0", b"7")  # regular file, its pre-POSIX spelling, contiguous file (as tarfile counts)
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: headers only
# Headers that rename or resize the member that follows them (pax, GNU long names, GNU sparse files). Our writer
# never emits them; read blindly, the next member would get a wrong name or size, so they end the shard instead.
_EXTENSION_TYPES = (b"x", b"g", b"L", b"K", b"S")


def _tar_members(stream: IO[bytes]) -> Iterator[_Member]:
    """The regular members of a tar stream (compressed or not), named the way webdataset names them.

    Only our ids members are read into memory; any other member's bytes are skipped without being handed to
    anyone, so whatever a hostile shard packs there is never loaded, let alone unpickled. An uncompressed ustar
    stream, which is what `prepare` writes, goes through `_ustar_members`; anything else (a compressed tar,
    another tar dialect, not a tar at all) goes to the standard library's tarfile, which also explains why it
    cannot read it.
    """
    head = _read_at_least(stream, b"", _BLOCK)
    if len(head) >= _BLOCK and head[257:262] == b"ustar":
        yield from _ustar_members(stream, head)
        return
    with tarfile.open(fileobj=_Prefixed(head, stream), mode="r|*") as tar:
        for info in tar:
            tar.members = []  # stream mode would otherwise keep every TarInfo of the shard
            if not info.isreg():
                continue
            name = _member_name(info.name)
            if name is None:
                continue
            key, suffix = name
            member = tar.extractfile(info) if suffix in ID_SUFFIXES else None
            yield key, suffix, None if member is None else member.read()


def _member_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case suffix) of a regular member, or None for webdataset metadata and suffix-less names."""
    if _META_MEMBER.match(name):
        return None
    match = _KEY_AND_SUFFIX.match(name)
    key, suffix = (match.group(1), match.group(2)) if match else (None, None)
    return None if key is None else (key, suffix.lower())


def _ustar_members(stream: IO[bytes], buf: bytes) -> Iterator[_Member]:
    """`_tar_members` of an uncompressed ustar stream, `buf` holding its first bytes (at least one block).

    A minimal, strict reader for the plain headers our writer (Python's tarfile through webdataset) produces:
    every header must carry the ustar magic, a valid checksum and an octal size; anything else raises
    tarfile.ReadError naming the byte offset, so the shard counts as broken from there on. Parsing the header
    fields we need by slicing costs a few microseconds a member, where tarfile's TarInfo costs tens.
    """
    pos = 0  # where the next header starts in buf
    base = 0  # offset of buf[0] in the tar, for messages
    while True:
        if len(buf) - pos < _BLOCK:
            buf, base, pos = _read_at_least(stream, buf[pos:], _BLOCK), base + pos, 0
            if not buf:
                return  # the tar ends at a member boundary without its end-of-archive blocks: so does tarfile
            if len(buf) < _BLOCK:
                raise tarfile.ReadError(f"truncated header at byte {base}")
        header = buf[pos : pos + _BLOCK]
        if header == _ZERO_BLOCK:
            return  # end of archive
        name, kind, size = _parse_header(header, base + pos)
        data = pos + _BLOCK  # where the member's data starts in buf
        if kind in _EXTENSION_TYPES:
            raise tarfile.ReadError(
                f"header at byte {base + pos} is of type {kind!r}, a pax/GNU extension that distil-scale shards "
                "never hold"
            )
        if kind in _NO_DATA_TYPES:
            pos = data
            continue
        member = _member_name(name) if kind in _REGULAR_TYPES else None
        if member is not None and member[1] in ID_SUFFIXES:
            if len(buf) - data < size:
                buf, base, data = _read_at_least(stream, buf[pos:], _BLOCK + size), base + pos, _BLOCK
                pos = 0
                if len(buf) - data < size:
                    raise tarfile.ReadError(f"unexpected end of data in the member at byte {base}")
            yield member[0], member[1], buf[data : data + size]
        elif member is not None:
            yield member[0], member[1], None
        # Skip the data and its padding to the next block boundary, reading (and dropping) what buf lacks.
        pos = data + -(-size // _BLOCK) * _BLOCK
        if pos > len(buf):
            _skip(stream, pos - len(buf), base + len(buf))
            buf, base, pos = b"", base + pos, 0


def _parse_header(header: bytes, offset: int) -> tuple[str, bytes, int]:
    """(name, type flag, data size) of a 512-byte ustar header found at byte `offset`; ReadError if malformed."""
    if header[257:262] != b"ustar":
        raise tarfile.ReadError(f"no ustar header at byte {offset}")
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        size = -1
    if size < 0:  # int() would also take a sign; base-256 sizes (members of 8 GiB and more) are not ours either
        raise tarfile.ReadError(f"header at byte {offset} has a malformed checksum or size field")
    # The checksum is the sum of the header's bytes with its own 8-byte field counted as spaces. adler32's low 16
    # bits are 1 + the byte sum modulo 65521, which is the exact sum for 256 bytes (at most 255 * 256 = 65280):
    # two C calls instead of a Python loop over 512 bytes.
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    if stored != total - sum(header[148:156]) + 8 * 32 and stored != _signed_checksum(header):
        raise tarfile.ReadError(f"bad header checksum at byte {offset}")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]  # ustar keeps long paths as prefix / name
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), header[156:157], size


def _signed_checksum(header: bytes) -> int:
    """The checksum some old tars wrote: bytes summed as signed chars (tarfile accepts it too)."""
    return 8 * 32 + sum(struct.unpack_from("148b8x356b", header))


def _read_at_least(stream: IO[bytes], buf: bytes, size: int) -> bytes:
    """`buf` followed by what `stream` gives until it holds `size` bytes or the stream ends."""
    parts, have = [buf], len(buf)
    while have < size:
        chunk = stream.read(max(_READ_SIZE, size - have))
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts) if len(parts) > 1 else buf


def _skip(stream: IO[bytes], size: int, offset: int) -> None:
    """Read and drop `size` bytes of `stream` (a pipe cannot seek); ReadError if it ends first."""
    while size > 0:
        chunk = stream.read(min(size, _READ_SIZE))
        if not chunk:
            raise tarfile.ReadError(f"unexpected end of data at byte {offset}")
        size -= len(chunk)
        offset += len(chunk)


class _Prefixed(io.RawIOBase):
    """A read-only stream of `head` followed by the rest of `stream`: the bytes `_tar_members` already looked at."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            size = min(len(buffer), len(self._head))
            buffer[:size], self._head = self._head[:size], self._head[size:]
            return size
        chunk = self._stream.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def tar_samples(stream: IO[bytes]) -> Generator[Group, None, None]:
    """Consecutive members with the same key, grouped into samples; then whatever error stopped the tar.

    The sample being assembled when the tar breaks off is still yielded (before the error is re-raised): every
    member it holds was read in full, so if its ids member made it, so did the sample.
    """
    key: str | None = None
    members: list[tuple[str, bytes | None]] = []
    error: Exception | None = None
    try:
        for member_key, suffix, data in _tar_members(stream):
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, []
            members.append((suffix, data))
    except Exception as exc:  # the caller decides what a broken shard means; here it only must not lose a sample
        error = exc
    if key is not None:
        yield key, members
    if error is not None:
        raise error
