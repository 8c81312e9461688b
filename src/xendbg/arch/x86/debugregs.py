"""Debug registers DR0-DR3, DR6 and DR7 (Intel SDM vol. 3, §17.2).

Pure bit work: which DR7 bits arm which slot, which DR6 bits say what fired,
and how to cut a watched range into pieces the hardware can watch.  Writing
the registers is the backend's job; choosing slots for users is the engine's.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from xendbg.errors import Unsupported

NUM_SLOTS = 4

# DR7 bit 10 is reserved and reads as 1; a fresh DR7 (after reset) is 0x400.
DR7_RESERVED_ONE = 1 << 10
DR7_LE = 1 << 8  # exact local breakpoints (recommended for data breakpoints)
DR7_GE = 1 << 9
DR7_RTM = 1 << 11
DR7_GD = 1 << 13  # general detect: #DB on any MOV DRn
DR7_INIT = DR7_RESERVED_ONE


class RW(enum.IntEnum):
    """DR7 R/Wn: the access that triggers slot n."""

    EXECUTE = 0b00  # instruction execution
    WRITE = 0b01  # data writes
    IO = 0b10  # I/O reads or writes (needs CR4.DE = 1)
    ACCESS = 0b11  # data reads or writes, not instruction fetches


# LENn encodings: 1, 2, 8, 4 bytes for 00, 01, 10, 11 (8 only in IA-32e mode).
_LEN_TO_BITS = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
_BITS_TO_LEN = {v: k for k, v in _LEN_TO_BITS.items()}


class DR6(enum.IntFlag):
    """DR6 status bits."""

    B0 = 1 << 0  # slot 0 condition met
    B1 = 1 << 1
    B2 = 1 << 2
    B3 = 1 << 3
    BD = 1 << 13  # next instruction accesses a debug register (DR7.GD)
    BS = 1 << 14  # single step (EFLAGS.TF)
    BT = 1 << 15  # task switch to a TSS with the T flag


@dataclass(frozen=True, slots=True)
class Slot:
    """The DR7 settings of one slot."""

    local: bool = False
    global_: bool = False
    rw: RW = RW.EXECUTE
    length: int = 1

    @property
    def enabled(self) -> bool:
        return self.local or self.global_


def dr7_decode(dr7: int) -> tuple[Slot, Slot, Slot, Slot]:
    """The four slots DR7 describes."""
    slots = []
    for n in range(NUM_SLOTS):
        field = dr7 >> (16 + 4 * n)
        slots.append(
            Slot(
                local=bool(dr7 >> (2 * n) & 1),
                global_=bool(dr7 >> (2 * n + 1) & 1),
                rw=RW(field & 0b11),
                length=_BITS_TO_LEN[field >> 2 & 0b11],
            )
        )
    return slots[0], slots[1], slots[2], slots[3]


def _slot_bits(n: int, slot: Slot) -> int:
    if slot.length not in _LEN_TO_BITS:
        raise ValueError(f"debug register length must be 1, 2, 4 or 8, not {slot.length}")
    field = slot.rw | _LEN_TO_BITS[slot.length] << 2
    return slot.local << (2 * n) | slot.global_ << (2 * n + 1) | field << (16 + 4 * n)


def _slot_mask(n: int) -> int:
    return 0b11 << (2 * n) | 0b1111 << (16 + 4 * n)


def dr7_encode(slots: Sequence[Slot], base: int = DR7_INIT) -> int:
    """DR7 with ``slots`` (up to four, slot 0 first) over the other bits of ``base``."""
    if len(slots) > NUM_SLOTS:
        raise ValueError(f"DR7 has {NUM_SLOTS} slots, not {len(slots)}")
    dr7 = base
    for n, slot in enumerate(slots):
        dr7 = dr7 & ~_slot_mask(n) | _slot_bits(n, slot)
    return dr7


def check_alignment(addr: int, length: int, rw: RW) -> None:
    """Raise ValueError unless the hardware can watch ``length`` bytes at ``addr``.

    A length-N slot matches the N-aligned block holding ``addr`` (the CPU ignores
    the low address bits), so an unaligned request would watch the wrong bytes;
    instruction breakpoints must use length 1 (SDM §17.2.5).
    """
    if length not in _LEN_TO_BITS:
        raise ValueError(f"debug register length must be 1, 2, 4 or 8, not {length}")
    if rw is RW.EXECUTE and length != 1:
        raise ValueError("instruction breakpoints must have length 1")
    if addr % length:
        raise ValueError(f"a {length}-byte watch needs a {length}-aligned address, not {addr:#x}")


def free_slot(dr7: int) -> int | None:
    """The lowest slot whose L and G bits are both clear, or None."""
    for n in range(NUM_SLOTS):
        if not dr7 >> (2 * n) & 0b11:
            return n
    return None


def arm(dr7: int, n: int, rw: RW, length: int, *, global_: bool = False) -> int:
    """DR7 with slot ``n`` enabled (locally, or globally) for ``rw``/``length``.

    The caller loads the address into DRn; alignment is checked against it by
    :func:`check_alignment`, not here.
    """
    if not 0 <= n < NUM_SLOTS:
        raise ValueError(f"no debug register slot {n}")
    if rw is RW.EXECUTE and length != 1:
        raise ValueError("instruction breakpoints must have length 1")
    slot = Slot(local=not global_, global_=global_, rw=rw, length=length)
    return dr7 & ~_slot_mask(n) | _slot_bits(n, slot)


def disarm(dr7: int, n: int) -> int:
    """DR7 with slot ``n`` disabled and its R/W and LEN fields cleared."""
    if not 0 <= n < NUM_SLOTS:
        raise ValueError(f"no debug register slot {n}")
    return dr7 & ~_slot_mask(n)


def allocate(dr7: int, addr: int, length: int, rw: RW) -> tuple[int, int]:
    """Arm the lowest free slot for one aligned watch: returns (slot, new DR7).

    Raises Unsupported when all four slots are taken, ValueError when the
    request is not aligned (see :func:`split_range`).
    """
    check_alignment(addr, length, rw)
    n = free_slot(dr7)
    if n is None:
        raise Unsupported("hardware breakpoint", "all four debug registers are in use")
    return n, arm(dr7, n, rw, length)


def triggered(dr6: int) -> list[int]:
    """The slots whose B0-B3 bit is set in ``dr6``."""
    return [n for n in range(NUM_SLOTS) if dr6 >> n & 1]


def split_range(
    addr: int, length: int, *, max_len: int = 8, slots: int | None = NUM_SLOTS
) -> list[tuple[int, int]]:
    """Cut [addr, addr+length) into aligned (addr, len) pieces a slot can watch.

    Greedy largest-aligned-piece-first, which yields the fewest pieces.  ``max_len``
    is 8 for 64-bit guests and 4 for 32-bit ones (LEN=10 is undefined outside
    IA-32e mode).  Raises Unsupported if more than ``slots`` pieces are needed
    (None: no limit).
    """
    if length <= 0:
        raise ValueError(f"watch length must be positive, not {length}")
    if max_len not in (4, 8):
        raise ValueError(f"max_len must be 4 or 8, not {max_len}")
    pieces: list[tuple[int, int]] = []
    end = addr + length
    while addr < end:
        size = max_len
        while addr % size or size > end - addr:
            size //= 2
        pieces.append((addr, size))
        addr += size
    if slots is not None and len(pieces) > slots:
        raise Unsupported(
            "hardware watchpoint",
            f"{length} bytes at {pieces[0][0]:#x} need {len(pieces)} debug registers",
        )
    return pieces
