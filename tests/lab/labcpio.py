"""Writes "newc" cpio archives (the format Linux unpacks as an initramfs), owned by root.

The lab hands dom0 several archives concatenated in one initrd: the cached Debian image, the
cached Python dependencies and a small per-run overlay (the work tree). The kernel unpacks them
in order, later files replacing earlier ones, and creates nothing implicitly: a file's parent
directories must come before it in some archive, so ``Archive`` adds missing parents itself.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_ROOT_ONLY = 0o755


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class Archive:
    """A cpio archive being written to ``out``; ``close`` writes the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 0
        self._dirs: set[str] = {"."}

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))

    @staticmethod
    def _name(path: str) -> str:
        """Archive names are relative ("opt/x"), as `find .` produces them; "" is invalid."""
        name = str(PurePosixPath("/", path).relative_to("/"))
        if name == ".":
            raise ValueError(f"not a file path: {path!r}")
        return name

    def directory(self, path: str, mode: int = _ROOT_ONLY) -> None:
        name = self._name(path)
        if name in self._dirs:
            return
        parent = str(PurePosixPath(name).parent)
        if parent != ".":
            self.directory(parent)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)
        self._dirs.add(name)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = self._name(path)
        parent = str(PurePosixPath(name).parent)
        if parent != ".":
            self.directory(parent)
        self._entry(name, stat.S_IFREG | mode, data)

    def tree(self, source: Path, dest: str, keep: Callable[[Path], bool] = lambda p: True) -> int:
        """Add the regular files under ``source`` (recursively, sorted) below ``dest``, keeping
        their executable bits; ``keep`` filters by path. Returns the number of files added."""
        count = 0
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for fname in sorted(files):
                path = Path(root, fname)
                if not path.is_file() or not keep(path):
                    continue
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                rel = path.relative_to(source).as_posix()
                self.file(f"{dest}/{rel}", path.read_bytes(), mode)
                count += 1
        return count

    def close(self) -> None:
        self._entry(TRAILER, 0)


def read_names(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, content) of every entry before the trailer; for checks and tests."""
    entries: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != MAGIC:
            raise ValueError(f"no newc header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        if name == TRAILER:
            return entries
        entries.append((name, mode, data[start : start + size]))
        pos = start + size + (-(start + size) % 4)
