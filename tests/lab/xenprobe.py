"""In-dom0 probes of xendbg's engine on a real Xen domain, for the lab scenarios.

    python3 xenprobe.py inspect NAME ELF --marker SYM [--write-counter VALUE]  (+ hash, verify)
    python3 xenprobe.py hash NAME ELF
    python3 xenprobe.py reattach NAME
    python3 xenprobe.py verify NAME ELF          (hash + reattach)
    python3 xenprobe.py step NAME ELF COUNT

Each probe attaches by name through ``xendbg.backend.xen.domain.attach``, works through
``engine.Session`` (page walks with the guest's own CR3), prints what it saw as one JSON line
prefixed ``PROBE `` and exits 0; any failure is a traceback and a non-zero status. A probe
runs in its own process so that a crash or a hang cannot take the scenario runner with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from xendbg.backend.base import GuestType
from xendbg.backend.xen.domain import XenDomain, attach
from xendbg.engine.session import Session
from xendbg.engine.stops import StopReason
from xendbg.engine.vmem import VirtualMemory

R15_MAGIC = 0x5EED_0F_C0FFEE_15
PF_X = 1
PAGE = 0x1000
START_INFO_MAGIC_LEN = 32
START_INFO_PT_BASE = 88  # struct start_info (xen.h), 64-bit


class Elf:
    """Symbols and loadable bytes of a guest image."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            symtab = elf.get_section_by_name(".symtab")
            assert isinstance(symtab, SymbolTableSection)
            self.symbols = {s.name: (s["st_value"], s["st_size"]) for s in symtab.iter_symbols()}
            self.segments = [
                (seg["p_vaddr"], seg["p_flags"], seg.data())
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD"
            ]

    def addr(self, name: str) -> int:
        return int(self.symbols[name][0])

    def code(self) -> Iterator[tuple[int, bytes]]:
        """(vaddr, file bytes) of every executable PT_LOAD."""
        for vaddr, flags, data in self.segments:
            if flags & PF_X and data:
                yield vaddr, data

    def bytes_at(self, vaddr: int, size: int) -> bytes:
        for start, _, data in self.segments:
            if start <= vaddr < start + len(data):
                return data[vaddr - start : vaddr - start + size]
        raise KeyError(f"{vaddr:#x} is not in the image")

    def where(self, addr: int) -> str:
        best = None
        for name, (value, size) in self.symbols.items():
            if name and value <= addr < value + max(size, 1) and (best is None or value > best[1]):
                best = (name, value)
        return f"{best[0]}+{addr - best[1]:#x}" if best else hex(addr)


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, what: str) -> None:
        self.marks[what] = round(time.monotonic() - self.start, 3)


def xl_state(name: str) -> str:
    """The state column of ``xl list NAME`` (e.g. ``--p---`` while paused)."""
    out = subprocess.run(["xl", "list", name], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[1].split()[4]


def emit(result: dict[str, Any]) -> None:
    print("PROBE " + json.dumps(result), flush=True)


def inspect(name: str, elf: Elf, marker: str, write_counter: int | None) -> dict[str, Any]:
    """The session checks, with ``verify`` before and after (one process: each Python start
    costs seconds under TCG)."""
    clock = Clock()
    before = code_hash(name, elf)
    clock.mark("hash")
    dom = attach(name)
    clock.mark("attach")
    out: dict[str, Any] = {"domid": dom.domid, "type": str(dom.guest_type)}
    out["capabilities"] = [c.name for c in type(dom.capabilities) if c in dom.capabilities]
    session = Session(dom)
    clock.mark("session")
    try:
        out["state_attached"] = xl_state(name)
        regs = session.registers(0)
        out |= {"rip": regs["rip"], "rip_at": elf.where(regs["rip"]), "cr3": regs["cr3"]}
        out["marker"] = session.read_memory(0, elf.addr(marker), 16).split(b"\0")[0].decode()
        counter_va = elf.addr("counter")
        counter = int.from_bytes(session.read_memory(0, counter_va, 8), "little")
        out["counter"] = counter
        if dom.guest_type is GuestType.PV:
            # The builder's page tables: start_info.pt_base is their virtual address,
            # CR3 their machine address; the walk must agree.
            si = int.from_bytes(session.read_memory(0, elf.addr("start_info"), 8), "little")
            raw = session.read_memory(0, si, START_INFO_PT_BASE + 8)
            out["start_info"] = si
            out["start_info_magic"] = raw[:START_INFO_MAGIC_LEN].split(b"\0")[0].decode()
            pt_base = int.from_bytes(raw[START_INFO_PT_BASE:], "little")
            out["pt_base"] = pt_base
            out["pt_base_machine"] = session.translate(0, pt_base)
        clock.mark("reads")
        # Registers: a value written reaches the vCPU and survives it running.
        r15 = regs["r15"]
        session.set_registers(0, {"r15": R15_MAGIC})
        out["r15_written"] = session.registers(0)["r15"]
        session.resume()
        time.sleep(0.5)
        out["state_running"] = xl_state(name)
        session.interrupt()
        stop = session.wait(10.0)
        out["interrupt_stop"] = None if stop is None else stop.reason.value
        out["counter_after_run"] = int.from_bytes(session.read_memory(0, counter_va, 8), "little")
        out["r15_after_run"] = session.registers(0)["r15"]
        session.set_registers(0, {"r15": r15})
        clock.mark("pause-unpause")
        if write_counter is not None:
            session.write_memory(0, counter_va, write_counter.to_bytes(8, "little"))
            out["counter_written"] = int.from_bytes(session.read_memory(0, counter_va, 8), "little")
        clock.mark("write")
    finally:
        session.detach()
        dom.close()
    clock.mark("detach")
    out["state_detached"] = xl_state(name)
    out["before"] = before
    out["after"] = verify(name, elf)
    clock.mark("verify")
    out["seconds"] = clock.marks
    return out


def verify(name: str, elf: Elf) -> dict[str, Any]:
    """After a debugger left: the code pages as the image, and a second full attach works."""
    return code_hash(name, elf) | {"reattach": reattach(name)}


def code_hash(name: str, elf: Elf) -> dict[str, Any]:
    """The guest's code pages read through its own page tables, hashed and compared with
    the image: no pause, no events (reading code that does not change)."""
    dom = attach(name, events=False)
    try:
        vmem = VirtualMemory(dom)
        ctx = VirtualMemory.context(dom.get_registers(0))
        segments = []
        hypercall_page = elf.symbols.get("hypercall_page", (None, 0))[0]
        for vaddr, data in elf.code():
            mem = vmem.read(ctx, vaddr, len(data))
            seg: dict[str, Any] = {"vaddr": vaddr, "size": len(data)}
            if hypercall_page is not None and vaddr <= hypercall_page < vaddr + len(data):
                # A PV image's hypercall page is filled in by Xen's domain builder.
                off = hypercall_page - vaddr
                stubs = mem[off : off + PAGE]
                seg["hypercall_page_filled"] = any(stubs)
                mem = mem[:off] + data[off : off + PAGE] + mem[off + PAGE :]
                seg["hypercall_page_sha256"] = hashlib.sha256(stubs).hexdigest()
            seg["sha256"] = hashlib.sha256(mem).hexdigest()
            seg["matches_elf"] = mem == data
            segments.append(seg)
    finally:
        dom.close()
    return {"segments": segments}


def reattach(name: str) -> dict[str, Any]:
    """A full attach (vm_event ring for HVM/PVH) and detach: fails with DomainBusy if an
    earlier debugger left its monitor ring behind."""
    dom = attach(name)
    try:
        session = Session(dom)
        stop = session.stop
        session.detach()
    finally:
        dom.close()
    return {"ok": True, "stop": stop.reason.value, "pc": stop.pc}


def expected_next(elf: Elf, session: Session, rip: int) -> tuple[set[int], str]:
    """Where one instruction at ``rip`` can go, from the image's own bytes (capstone)."""
    from capstone import CS_ARCH_X86, CS_GRP_CALL, CS_GRP_JUMP, CS_GRP_RET, CS_MODE_64, Cs
    from capstone.x86 import X86_OP_IMM

    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    insn = next(md.disasm(elf.bytes_at(rip, 16), rip))
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    fall = rip + insn.size
    if insn.group(CS_GRP_RET):
        rsp = session.registers(0)["rsp"]
        return {int.from_bytes(session.read_memory(0, rsp, 8), "little")}, text
    if insn.group(CS_GRP_CALL) or insn.group(CS_GRP_JUMP):
        ops = insn.operands
        if ops and ops[0].type == X86_OP_IMM:
            target = ops[0].imm & (1 << 64) - 1  # capstone gives a signed value
            return ({target} if insn.mnemonic in ("call", "jmp") else {target, fall}), text
        return set(), text  # indirect: anywhere
    return {fall}, text


def step(name: str, elf: Elf, count: int) -> dict[str, Any]:
    dom = attach(name)
    out: dict[str, Any] = {"type": str(dom.guest_type)}
    if isinstance(dom, XenDomain) and dom.guest_type is not GuestType.PV:
        out["monitor_capabilities"] = dom.xc.monitor_capabilities(dom.domid)
    out["capabilities"] = [c.name for c in type(dom.capabilities) if c in dom.capabilities]
    session = Session(dom)
    steps = []
    try:
        rip = session.pc(0)
        start = time.monotonic()
        for _ in range(count):
            allowed, text = expected_next(elf, session, rip)
            stop = session.step(0)
            steps.append(
                {
                    "rip": rip,
                    "at": elf.where(rip),
                    "insn": text,
                    "next": stop.pc,
                    "reason": stop.reason.value,
                    "ok": stop.reason is StopReason.STEP and (not allowed or stop.pc in allowed),
                }
            )
            rip = stop.pc
        out["seconds_per_step"] = (time.monotonic() - start) / max(count, 1)
    finally:
        session.detach()
        dom.close()
    out["steps"] = steps
    out["state_detached"] = xl_state(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("inspect")
    p.add_argument("name")
    p.add_argument("elf")
    p.add_argument("--marker", required=True)
    p.add_argument("--write-counter", type=lambda s: int(s, 0))
    p = sub.add_parser("hash")
    p.add_argument("name")
    p.add_argument("elf")
    p = sub.add_parser("reattach")
    p.add_argument("name")
    p = sub.add_parser("verify")
    p.add_argument("name")
    p.add_argument("elf")
    p = sub.add_parser("step")
    p.add_argument("name")
    p.add_argument("elf")
    p.add_argument("count", type=int)
    args = parser.parse_args(argv)
    if args.probe == "inspect":
        emit(inspect(args.name, Elf(args.elf), args.marker, args.write_counter))
    elif args.probe == "hash":
        emit(code_hash(args.name, Elf(args.elf)))
    elif args.probe == "reattach":
        emit(reattach(args.name))
    elif args.probe == "verify":
        emit(verify(args.name, Elf(args.elf)))
    else:
        emit(step(args.name, Elf(args.elf), args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
