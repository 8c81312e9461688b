"""The emulated backend: a guest ELF on Unicorn with Xen HVM event semantics."""

from xendbg.backend.emu.domain import DEFAULT_MEMORY, EmuDomain
from xendbg.backend.emu.vcpu import VcpuState

__all__ = ["DEFAULT_MEMORY", "EmuDomain", "VcpuState"]
