"""Watchpoints from page access rights (Xen mem_access / EPT; seed 002's method).

A watched range restricts the rights of every guest frame it touches; the
hypervisor then reports *every* forbidden access to those frames, and we keep
only those that touch a watched byte (byte-exact filtering).  The frame keeps
its restricted rights between hits (re-arming is implicit), and its original
rights come back when the last watch on it goes.
"""

from __future__ import annotations

from dataclasses import dataclass

from xendbg.backend.base import Access, Domain, Event
from xendbg.engine.stops import WatchKind

PAGE_SHIFT = 12

# Accesses each kind must see.  EPT cannot express write-only, so a read watch
# leaves only execute: writes are reported too and filtered out by match().
_FORBID: dict[WatchKind, Access] = {
    WatchKind.WRITE: Access.W,
    WatchKind.READ: Access.R | Access.W,
    WatchKind.ACCESS: Access.R | Access.W,
}
_TRIGGERS: dict[WatchKind, Access] = {
    WatchKind.WRITE: Access.W,
    WatchKind.READ: Access.R,
    WatchKind.ACCESS: Access.R | Access.W,
}


@dataclass(frozen=True, slots=True)
class PageWatch:
    kind: WatchKind
    addr: int  # linear start, as the user gave it
    length: int
    ranges: tuple[tuple[int, int], ...]  # (gpa, length) pieces

    def frames(self) -> set[int]:
        out: set[int] = set()
        for gpa, n in self.ranges:
            out.update(range(gpa >> PAGE_SHIFT, ((gpa + n - 1) >> PAGE_SHIFT) + 1))
        return out

    def hit(self, gpa: int) -> int | None:
        """Linear address of ``gpa`` if it is a watched byte."""
        off = 0
        for start, n in self.ranges:
            if start <= gpa < start + n:
                return self.addr + off + (gpa - start)
            off += n
        return None


class PageWatches:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self._watches: list[PageWatch] = []
        self._original: dict[int, Access] = {}  # gfn → rights before we touched it

    def __len__(self) -> int:
        return len(self._watches)

    def insert(
        self, kind: WatchKind, addr: int, length: int, ranges: list[tuple[int, int]]
    ) -> None:
        w = PageWatch(kind, addr, length, tuple(ranges))
        self._watches.append(w)
        try:
            self._apply(w.frames())
        except BaseException:
            self._watches.remove(w)
            self._apply(w.frames())
            raise

    def remove(self, kind: WatchKind, addr: int, length: int) -> bool:
        for w in self._watches:
            if (w.kind, w.addr, w.length) == (kind, addr, length):
                self._watches.remove(w)
                self._apply(w.frames())
                return True
        return False

    def clear(self) -> None:
        frames = set(self._original)
        self._watches.clear()
        self._apply(frames)

    def match(self, ev: Event) -> tuple[WatchKind, int] | None:
        """The watch an access event hits, with the linear address it touched."""
        if ev.gpa is None:
            return None
        for w in self._watches:
            if not ev.access & _TRIGGERS[w.kind]:
                continue
            addr = w.hit(ev.gpa)
            if addr is not None:
                return w.kind, addr
        return None

    def _apply(self, frames: set[int]) -> None:
        """Give each frame the rights its remaining watches need."""
        for gfn in sorted(frames):
            forbid = Access.NONE
            for w in self._watches:
                if gfn in w.frames():
                    forbid |= _FORBID[w.kind]
            if forbid == Access.NONE:
                original = self._original.pop(gfn, None)
                if original is not None:
                    self.domain.set_mem_access(gfn, original)
                continue
            if gfn not in self._original:
                self._original[gfn] = self.domain.get_mem_access(gfn)
            self.domain.set_mem_access(gfn, self._original[gfn] & ~forbid)
