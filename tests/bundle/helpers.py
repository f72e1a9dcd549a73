"""Small real files for the bundle tests: tiny ONNX models, hand-made tar archives, disk usage,
and the CLI run as a user runs it.

Archives are written member by member so a test can put any name, size or order into them; the
gzip bomb is written streaming (its compressed block of zeros is repeated as concatenated gzip
members, which is still one valid gzip file), so a test never holds or writes the expanded bytes.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BLOCK = tarfile.BLOCKSIZE
ZERO_CHUNK = 1 << 20


def tiny_onnx(directory: Path, location: str | None = None, *, op: str = "MatMul") -> Path:
    """``directory/model.onnx``: y = x @ (2 I), x of shape (batch, 4); weight in external data at ``location``."""
    directory.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "tiny", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "model.onnx"
    if location is None:
        onnx.save(model, str(path))
    else:
        (directory / location).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                  size_threshold=0)
    return path


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, 0o644, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def empty_members(count: int) -> list[bytes]:
    """Headers of ``count`` empty regular files f00000, f00001, ...: one template, name and checksum patched
    (building each with tarfile takes seconds for 50,000)."""
    width = len(str(count - 1))
    template = tar_header("f" + "0" * width, 0)
    base = sum(template) - sum(template[148:156]) + 8 * ord(" ") - sum(template[1:1 + width])
    headers = []
    for i in range(count):
        digits = f"{i:0{width}d}".encode()
        checksum = f"{base + sum(digits):06o}\0".encode()
        headers.append(template[:1] + digits + template[1 + width:148] + checksum + template[155:])
    return headers


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member: header, data, padding to the 512-byte block."""
    return tar_header(name, len(data)) + data + b"\0" * (-len(data) % BLOCK)


def write_tar_gz(path: Path, members: Iterable[bytes], *, zeros_member: tuple[str, int] | None = None,
                 zeros_kind: bytes = tarfile.REGTYPE, trailing: Iterable[bytes] = ()) -> Path:
    """A .tar.gz of the given member bytes, then (optionally) a member of ``size`` zero bytes, then ``trailing``.

    The zero member is streamed as repeated gzip members of one compressed MiB, so a 1 GiB member
    costs about 1 MB on disk and no memory. ``zeros_kind`` makes it another entry type, e.g. a GNU
    long-name record, whose data tarfile reads into memory while parsing the next header.
    """
    zeros = gzip.compress(b"\0" * ZERO_CHUNK, compresslevel=9)
    with path.open("wb") as out:
        out.write(gzip.compress(b"".join(members), compresslevel=1))
        if zeros_member is not None:
            name, size = zeros_member
            assert size % ZERO_CHUNK == 0
            out.write(gzip.compress(tar_header(name, size, zeros_kind)))
            for _ in range(size // ZERO_CHUNK):
                out.write(zeros)
        out.write(gzip.compress(b"".join(trailing) + b"\0" * (2 * BLOCK)))
    return path


def bundle_members(bundle: Path, names: Iterable[str]) -> list[bytes]:
    return [tar_member(name, (bundle / name).read_bytes()) for name in names]


def disk_used(root: Path) -> int:
    """Bytes of disk really allocated under ``root`` (st_blocks, so sparse holes count as nothing)."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def staged_files(root: Path) -> set[str]:
    """Every file under ``root``, relative POSIX paths."""
    return {(Path(d) / name).relative_to(root).as_posix() for d, _s, files in os.walk(root) for name in files}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``compactai ARGS`` in a fresh interpreter (as a user runs it), output captured."""
    return subprocess.run([sys.executable, "-c", "from compactai.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300, check=False)
