"""Finding pickles without unpickling: the one check used by the loaders and the bundle verifier.

A file is pickle-based when its suffix is a pickle format, when its bytes parse as a pickle
stream (``pickletools`` reads opcodes; nothing is executed), when it is a ``.npy`` whose header
declares an object dtype (numpy would need pickle to read it), or when it is a zip (``.npz``,
a ``torch.save`` file, a ``.pt2``) holding any such member.

Every read is bounded (bytes parsed, opcodes, members, member-name length), so a hostile file
costs little memory or time. Leading bytes alone are not enough: protocol 0/1 pickles start
with ordinary ASCII (``cposix\\nsystem``), and a safetensors header length may start with
``0x80 0x02`` like a protocol-2 pickle; so the stream is parsed and classified by its shape.
"""

from __future__ import annotations

import ast
import io
import pickletools
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".sav"}
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"
MAX_MEMBERS = 65_536  # zip members inspected; more refuses the archive
MAX_NAME = 1024  # characters of a zip member name
MAX_OPS = 200_000  # pickle opcodes parsed per stream
MAX_SCAN_BYTES = 64 * 1024**2  # bytes of one stream parsed
MAX_ARG = 16 * 1024**2  # one opcode argument read into memory
MAX_NESTED_ZIP = 256 * 1024**2  # a zip inside a zip is opened (in memory) only up to this size
MAX_NPY_HEADER = 1 << 20

_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
# Opcodes that import a name, and opcodes that call or build an object: an import followed by a
# call is how every pickle payload runs code.
_IMPORTS = {"GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4"}
_CALLS = {"REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


class ZipBoundError(ValueError):
    """A zip declares more members than MAX_MEMBERS."""


class _Budget(Exception):
    """A parse limit was reached while every opcode so far was valid."""


class _BoundedReader:
    """The read/readline genops needs, refusing single reads over MAX_ARG and totals over MAX_SCAN_BYTES.

    An oversized read that the stream could satisfy raises _Budget (a valid opcode whose argument
    is large: a pickle shape); one the stream cannot satisfy is a truncated, invalid stream.
    """

    def __init__(self, stream: IO[bytes], size: int) -> None:
        self.stream, self.size, self.used = stream, size, 0

    def _take(self, n: int) -> None:
        self.used += n
        if self.used > MAX_SCAN_BYTES:
            raise _Budget

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > MAX_ARG:
            if n >= 0 and self.used + n > self.size:
                return b""  # genops reports a truncated argument: not a valid pickle here
            raise _Budget
        data = self.stream.read(n)
        self._take(len(data))
        return data

    def readline(self, limit: int = -1) -> bytes:
        line = self.stream.readline(MAX_ARG)
        self._take(len(line))
        if len(line) == MAX_ARG and not line.endswith(b"\n"):
            raise _Budget
        return line

    def tell(self) -> int:
        return self.used


def stream_is_pickle(stream: IO[bytes], size: int) -> bool:
    """True if ``stream`` parses as a pickle: it reaches STOP, or imports a name and calls it,
    or it is still a valid stream when a parse limit is reached. Nothing is unpickled.

    Random or numeric data fails within a few opcodes (an unknown opcode, a missing newline,
    a stack underflow), so weight files are not mistaken for pickles.
    """
    start = stream.tell()
    first = stream.read(1)
    stream.seek(start)
    if first not in _OPCODES:
        return False
    reader = _BoundedReader(stream, size - start)
    depth: list[int] = []  # stack items above each mark (a simulation of the unpickler's stack, by counts)
    stack = 0
    imported = False
    memo: set[Any] = set()
    ops = 0
    first_name = ""
    try:
        for opcode, arg, _pos in pickletools.genops(reader):  # type: ignore[arg-type]  # duck-typed stream
            ops += 1
            if ops > MAX_OPS:
                raise _Budget
            first_name = first_name or opcode.name
            if opcode.name in _PUTS:
                memo.add(len(memo) if opcode.name == "MEMOIZE" else arg)
            elif (opcode.name in _GETS and arg not in memo) or opcode.name == "NEXT_BUFFER":
                return False  # an unwritten memo slot, or out-of-band data nobody passes: the unpickler fails
            before = opcode.stack_before
            if pickletools.markobject in before:
                if not depth:
                    return False  # no mark to pop: the unpickler would fail here
                stack = depth.pop()  # the items above the mark are consumed with it
                before = before[: before.index(pickletools.markobject)]
            if len(before) > stack:
                return False  # stack underflow: the unpickler would fail before this opcode
            stack -= len(before)
            if pickletools.markobject in opcode.stack_after:
                depth.append(stack)
            else:
                stack += len(opcode.stack_after)
            if opcode.name in _IMPORTS:
                imported = True
            if imported and opcode.name in _CALLS:
                return True
            if opcode.name == "STOP":
                # A complete stream. Two or three random bytes can spell a trivial one ("}." is an empty
                # dict), so it counts when it is the whole file, has a protocol header, or is longer.
                return first_name == "PROTO" or ops >= 4 or not reader.stream.read(1)
    except _Budget:
        return True
    except (ValueError, UnicodeDecodeError, OverflowError):
        return False
    return False


def npy_object_reason(stream: IO[bytes]) -> str | None:
    """Why a ``.npy`` stream would need pickle (an object dtype), read from its header only."""
    stream.read(len(NPY_MAGIC))
    version = stream.read(2)
    if len(version) != 2 or version[0] not in (1, 2, 3):
        return "it has a malformed .npy header"
    length_bytes = stream.read(2 if version[0] == 1 else 4)
    length = int.from_bytes(length_bytes, "little")
    if length > MAX_NPY_HEADER:
        return "its .npy header is implausibly large"
    header = stream.read(length).decode("latin-1" if version[0] < 3 else "utf-8", errors="replace")
    try:
        fields = ast.literal_eval(header.strip())  # numpy's own reader parses it the same way
        descr = fields["descr"]
    except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError):
        return "it has a malformed .npy header"
    if _descr_has_object(descr):
        return "it holds an object-dtype array, which numpy reads with pickle"
    return None


def _descr_has_object(descr: object) -> bool:
    if isinstance(descr, str):
        return "O" in descr
    if isinstance(descr, (list, tuple)):
        return any(_descr_has_object(part) for part in descr)
    return True  # not a dtype description numpy writes: treat as unsafe


def declared_zip_members(stream: IO[bytes]) -> int:
    """The member count a zip's end-of-central-directory record declares (zip64 aware), read
    before ``zipfile`` builds a ZipInfo per member, so a hostile archive cannot exhaust memory."""
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    tail_start = max(0, size - (1 << 16) - 22)
    stream.seek(tail_start)
    tail = stream.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        raise zipfile.BadZipFile("no end-of-central-directory record")
    count = int.from_bytes(tail[at + 10 : at + 12], "little")
    locator = at - 20
    if count == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        stream.seek(int.from_bytes(tail[locator + 8 : locator + 16], "little"))
        record = stream.read(56)
        if record[:4] == b"PK\x06\x06" and len(record) == 56:
            count = int.from_bytes(record[32:40], "little")
    stream.seek(0)
    return count


def open_zip(stream: IO[bytes]) -> zipfile.ZipFile:
    """A ZipFile over ``stream`` once its declared member count is within MAX_MEMBERS.

    Raises zipfile.BadZipFile for a damaged archive and ZipBoundError for one over the bound.
    """
    if declared_zip_members(stream) > MAX_MEMBERS:
        raise ZipBoundError(f"it is a zip of over {MAX_MEMBERS} members")
    archive = zipfile.ZipFile(stream)
    if len(archive.infolist()) > MAX_MEMBERS:  # the central directory disagrees with its end record
        archive.close()
        raise ZipBoundError(f"it is a zip of over {MAX_MEMBERS} members")
    return archive


def zip_pickle_reason(archive: zipfile.ZipFile, nested: int = 0, skip: frozenset[str] = frozenset()) -> str | None:
    """Why a zip holds pickled data (a ``.pkl`` member, a member that parses as a pickle, an
    object-dtype ``.npy``, or a nested zip holding one), or None. Members named in ``skip``
    are not opened (raw tensor data of a ``.pt2`` whose config says so)."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        return f"it is a zip of over {MAX_MEMBERS} members"
    for info in infos:
        name = info.filename
        if len(name) > MAX_NAME:
            return f"it holds a member whose name is over {MAX_NAME} characters"
        if info.is_dir() or name in skip:
            continue
        if name.lower().endswith(tuple(PICKLE_SUFFIXES)):
            return f"it holds {name!r}, a pickle-based file"
        try:
            with archive.open(info) as member:
                reason = _member_reason(member, info.file_size, nested)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zlib.error) as exc:
            # unreadable to us does not mean unreadable to a lenient reader (torch's miniz): refuse
            return f"its member {name!r} cannot be inspected ({type(exc).__name__})"
        if reason:
            return f"its member {name!r}: {reason}"
    return None


def _member_reason(member: IO[bytes], size: int, nested: int) -> str | None:
    head = member.read(8)
    member.seek(0)  # zip member streams seek by re-reading: cheap this close to the start
    if head.startswith(NPY_MAGIC):
        return npy_object_reason(member)
    if head[:4] in ZIP_MAGIC:
        if nested >= 1:
            return "it nests zips more than one level deep"
        if size > MAX_NESTED_ZIP:
            return "it holds a nested zip too large to inspect"
        data = member.read(MAX_NESTED_ZIP)
        try:
            with open_zip(io.BytesIO(data)) as inner:
                return zip_pickle_reason(inner, nested + 1)
        except zipfile.BadZipFile:
            return None
        except ZipBoundError as exc:
            return str(exc)
    if stream_is_pickle(member, size):
        return "it is a pickle stream"
    return None


def pickle_reason(path: Path) -> str | None:
    """Why ``path`` is pickle-based (a short clause), or None. Reads bytes only; never unpickles."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"its suffix {path.suffix} is a pickle format"
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(8)
        stream.seek(0)
        if head.startswith(NPY_MAGIC):
            return npy_object_reason(stream)
        if head[:4] in ZIP_MAGIC:
            try:
                with open_zip(stream) as archive:
                    return zip_pickle_reason(archive)
            except zipfile.BadZipFile:
                stream.seek(0)  # not a readable zip: judge it as a stream below
            except ZipBoundError as exc:
                return str(exc)
            except (ValueError, RuntimeError, NotImplementedError, OSError, EOFError) as exc:  # encrypted, odd compression
                return f"it is a zip that cannot be inspected ({type(exc).__name__})"
        if stream_is_pickle(stream, size):
            return "it is a pickle stream"
    return None


def is_pickle_file(path: Path) -> bool:
    """True if ``path`` is pickle-based (see :func:`pickle_reason`)."""
    return pickle_reason(path) is not None
