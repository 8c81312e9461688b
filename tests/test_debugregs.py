"""DR7/DR6 encoding, slot allocation and watch-range splitting (Intel SDM vol. 3 §17.2)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xendbg.arch.x86.debugregs import (
    DR6,
    DR7_GD,
    DR7_INIT,
    DR7_LE,
    RW,
    Slot,
    allocate,
    arm,
    check_alignment,
    disarm,
    dr7_decode,
    dr7_encode,
    free_slot,
    split_range,
    triggered,
)
from xendbg.errors import Unsupported

slots_st = st.builds(
    Slot,
    local=st.booleans(),
    global_=st.booleans(),
    rw=st.sampled_from(list(RW)),
    length=st.sampled_from([1, 2, 4, 8]),
)
dr7_st = st.integers(0, 2**32 - 1)


def test_dr7_known_values() -> None:
    # SDM figure 17-2: L0 bit 0, G1 bit 3, R/W0 bits 16-17, LEN0 bits 18-19, R/W3 28-29.
    assert dr7_encode([Slot(local=True, rw=RW.WRITE, length=4)]) == DR7_INIT | 1 | 0b1101 << 16
    assert dr7_encode([Slot(), Slot(global_=True, rw=RW.ACCESS, length=8)]) == (
        DR7_INIT | 1 << 3 | 0b1011 << 20
    )
    assert dr7_encode([Slot()] * 3 + [Slot(local=True, rw=RW.IO, length=2)]) == (
        DR7_INIT | 1 << 6 | 0b0110 << 28
    )
    assert dr7_decode(0x400) == (Slot(), Slot(), Slot(), Slot())
    s0, s1, _, s3 = dr7_decode(0x000D_0001 | 1 << 7 | 0b0111 << 28)
    assert s0 == Slot(local=True, rw=RW.WRITE, length=4) and s0.enabled
    assert not s1.enabled
    assert s3 == Slot(global_=True, rw=RW.ACCESS, length=2)


@given(st.lists(slots_st, min_size=4, max_size=4), dr7_st)
def test_dr7_round_trip(slots: list[Slot], base: int) -> None:
    dr7 = dr7_encode(slots, base)
    assert dr7_decode(dr7) == tuple(slots)
    # Bits outside the slot fields (LE, GE, GD, bit 10 …) are kept from base.
    other = 0xFFFF_FFFF & ~(0xFF | 0xFFFF_0000)
    assert dr7 & other == base & other


@given(dr7_st)
def test_decode_encode_is_identity_on_slot_bits(dr7: int) -> None:
    assert dr7_encode(dr7_decode(dr7), dr7) == dr7


def test_bad_slot_length_and_count() -> None:
    with pytest.raises(ValueError):
        dr7_encode([Slot(local=True, length=3)])
    with pytest.raises(ValueError):
        dr7_encode([Slot()] * 5)


def test_allocation_fills_slots_in_order() -> None:
    dr7 = DR7_INIT | DR7_LE | DR7_GD
    used = []
    for i, (addr, length, rw) in enumerate(
        [(0x1000, 1, RW.EXECUTE), (0x2008, 8, RW.WRITE), (0x3004, 4, RW.ACCESS), (0x3F2, 2, RW.IO)]
    ):
        n, dr7 = allocate(dr7, addr, length, rw)
        assert n == i
        used.append(Slot(local=True, rw=rw, length=length))
        assert dr7_decode(dr7)[: i + 1] == tuple(used)
    assert free_slot(dr7) is None
    assert dr7 & (DR7_LE | DR7_GD) == DR7_LE | DR7_GD
    with pytest.raises(Unsupported):
        allocate(dr7, 0x5000, 1, RW.EXECUTE)
    dr7 = disarm(dr7, 2)
    assert free_slot(dr7) == 2
    assert dr7_decode(dr7)[2] == Slot()
    n, dr7 = allocate(dr7, 0x6000, 2, RW.WRITE)
    assert n == 2


def test_arm_global_and_free_slot_respects_g_bits() -> None:
    dr7 = arm(DR7_INIT, 0, RW.WRITE, 4, global_=True)
    assert dr7_decode(dr7)[0] == Slot(global_=True, rw=RW.WRITE, length=4)
    assert free_slot(dr7) == 1
    with pytest.raises(ValueError):
        arm(dr7, 4, RW.WRITE, 4)
    with pytest.raises(ValueError):
        arm(dr7, 1, RW.EXECUTE, 4)
    with pytest.raises(ValueError):
        disarm(dr7, -1)


def test_alignment_rules() -> None:
    check_alignment(0x1003, 1, RW.EXECUTE)
    check_alignment(0x1008, 8, RW.WRITE)
    with pytest.raises(ValueError, match="length 1"):
        check_alignment(0x1000, 4, RW.EXECUTE)
    with pytest.raises(ValueError, match="aligned"):
        check_alignment(0x1002, 4, RW.ACCESS)
    with pytest.raises(ValueError):
        check_alignment(0x1000, 3, RW.WRITE)
    with pytest.raises(ValueError):
        allocate(DR7_INIT, 0x1001, 2, RW.WRITE)


def test_dr6_bits() -> None:
    assert int(DR6.B0 | DR6.B3) == 0b1001
    assert (DR6.BD, DR6.BS, DR6.BT) == (1 << 13, 1 << 14, 1 << 15)
    assert triggered(0xFFFF0FF0 | DR6.B1 | DR6.B2 | DR6.BS) == [1, 2]
    assert triggered(0xFFFF0FF0) == []


def test_split_known_cases() -> None:
    assert split_range(0x1000, 8) == [(0x1000, 8)]
    assert split_range(0x1001, 4) == [(0x1001, 1), (0x1002, 2), (0x1004, 1)]
    assert split_range(0x1004, 8, max_len=4) == [(0x1004, 4), (0x1008, 4)]
    assert split_range(0x1006, 12) == [(0x1006, 2), (0x1008, 8), (0x1010, 2)]
    with pytest.raises(Unsupported, match="need 5"):
        split_range(0x1001, 16)
    assert split_range(0x1001, 15) == [(0x1001, 1), (0x1002, 2), (0x1004, 4), (0x1008, 8)]
    assert len(split_range(0x1001, 16, slots=None)) == 5
    with pytest.raises(ValueError):
        split_range(0x1000, 0)
    with pytest.raises(ValueError):
        split_range(0x1000, 4, max_len=2)


@given(st.integers(0, 2**48), st.integers(1, 200), st.sampled_from([4, 8]))
def test_split_properties(addr: int, length: int, max_len: int) -> None:
    pieces = split_range(addr, length, max_len=max_len, slots=None)
    covered = addr
    for piece_addr, piece_len in pieces:
        assert piece_len in (1, 2, 4, 8) and piece_len <= max_len
        assert piece_addr % piece_len == 0  # aligned: what the hardware can watch
        check_alignment(piece_addr, piece_len, RW.WRITE)
        assert piece_addr == covered  # in order, disjoint, no gaps
        covered += piece_len
    assert covered == addr + length  # exactly the range
    # Minimal: no two neighbours could merge into one aligned piece.
    for (a1, l1), (_, l2) in itertools.pairwise(pieces):
        assert not (l1 == l2 and 2 * l1 <= max_len and a1 % (2 * l1) == 0)
    if len(pieces) <= 4:
        assert split_range(addr, length, max_len=max_len) == pieces
    else:
        with pytest.raises(Unsupported):
            split_range(addr, length, max_len=max_len)
