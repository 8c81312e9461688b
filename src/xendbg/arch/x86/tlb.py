"""A software TLB over ``paging.walk`` and the ``Mmu`` convenience object.

Like a hardware TLB, the cache holds one entry per *page* (a cached 1 GiB
page serves every address inside it), is keyed by what decides a walk (CR3,
the paging mode, CR4.PSE and EFER.NXE where they apply), never caches a fault,
and does not notice page-table writes: the owner calls ``invalidate`` when the
guest may have changed its tables (after it ran, or after we wrote its memory).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from xendbg.arch.x86.paging import (
    DEFAULT_MAXPHYADDR,
    PagingContext,
    PagingMode,
    ReadPhys,
    Translation,
    split_range,
    walk,
)
from xendbg.errors import GuestMemoryFault

_Key = tuple[tuple[int, ...], int, int]  # (walk_key, page_size, linear page base)
# Page sizes by the mode code in walk_key[1].
_SIZES = [mode.page_sizes for mode in PagingMode]


class TranslationCache:
    """Bounded LRU of page translations."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[_Key, Translation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ctx: PagingContext, linear: int) -> Translation | None:
        """The cached translation of ``linear`` under ``ctx``, or None."""
        base = self.lookup_page(ctx, linear)
        return None if base is None else base.at(linear)

    def lookup_page(self, ctx: PagingContext, linear: int) -> Translation | None:
        """The cached translation of the page holding ``linear`` (for its base)."""
        wk = ctx.walk_key
        for size in _SIZES[wk[1]]:
            key = (wk, size, linear & ~(size - 1))
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit
        self.misses += 1
        return None

    def insert(self, ctx: PagingContext, t: Translation) -> None:
        key = (ctx.walk_key, t.page_size, t.linear_base)
        self._entries[key] = t.at(t.linear_base)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def invalidate(self, cr3: int | None = None) -> None:
        """Drop everything, or only the entries of the address space whose
        tables live in the page ``cr3`` points to (PCID/flag bits ignored)."""
        if cr3 is None:
            self._entries.clear()
            return
        root = cr3 & ~0xFFF
        for key in [k for k in self._entries if k[0][0] & ~0xFFF == root]:
            del self._entries[key]

    def invalidate_page(self, linear: int) -> None:
        """Drop every entry covering ``linear`` in any address space (like INVLPG)."""
        for key in [k for k in self._entries if k[2] == linear & ~(k[1] - 1)]:
            del self._entries[key]


class Mmu:
    """Cached translation over one guest's physical memory."""

    def __init__(
        self,
        read_phys: ReadPhys,
        *,
        maxphyaddr: int = DEFAULT_MAXPHYADDR,
        cache_capacity: int = 4096,
    ) -> None:
        self._read_phys = read_phys
        self.maxphyaddr = maxphyaddr
        self.cache = TranslationCache(cache_capacity)

    @staticmethod
    def context(ctrl: PagingContext | Mapping[str, int]) -> PagingContext:
        return ctrl if isinstance(ctrl, PagingContext) else PagingContext.from_registers(ctrl)

    def translate(self, ctrl: PagingContext | Mapping[str, int], linear: int) -> Translation:
        """Translate ``linear``; PageFault if it does not map."""
        ctx = self.context(ctrl)
        if ctx.mode is PagingMode.NONE:
            return walk(self._read_phys, ctx, linear, maxphyaddr=self.maxphyaddr)
        hit = self.cache.lookup(ctx, linear)
        if hit is not None:
            return hit
        t = walk(self._read_phys, ctx, linear, maxphyaddr=self.maxphyaddr)
        self.cache.insert(ctx, t)
        return t

    def translate_range(
        self, ctrl: PagingContext | Mapping[str, int], linear: int, size: int
    ) -> list[tuple[int, int]]:
        """(gpa, length) chunks of ``[linear, linear+size)``, one per page touched."""
        ctx = self.context(ctrl)
        if ctx.mode is PagingMode.NONE:
            return split_range(lambda la: self.translate(ctx, la), linear, size)
        # The common case, all pages cached, without building a Translation per page.
        chunks: list[tuple[int, int]] = []
        end = linear + size
        la = linear
        while la < end:
            page = self.cache.lookup_page(ctx, la)
            if page is None:
                return split_range(lambda a: self.translate(ctx, a), linear, size)
            off = la - page.linear
            length = min(page.page_size - off, end - la)
            chunks.append((page.gpa + off, length))
            la += length
        return chunks

    def read_linear(self, ctrl: PagingContext | Mapping[str, int], linear: int, size: int) -> bytes:
        """Read ``size`` bytes at ``linear``.  Every page is translated first, so a
        PageFault leaves nothing half-read; an unbacked gpa raises GuestMemoryFault
        naming the linear address."""
        chunks = self.translate_range(ctrl, linear, size)
        out = bytearray()
        for gpa, length in chunks:
            try:
                out += self._read_phys(gpa, length)
            except GuestMemoryFault as exc:
                bad = linear + len(out) + max(0, exc.addr - gpa)
                raise GuestMemoryFault(bad, f"guest-physical {exc.addr:#x}: {exc.reason}") from exc
        return bytes(out)

    def invalidate(self, cr3: int | None = None) -> None:
        self.cache.invalidate(cr3)

    def invalidate_page(self, linear: int) -> None:
        self.cache.invalidate_page(linear)
