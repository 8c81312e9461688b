"""The ``xendbg`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from xendbg import __version__
from xendbg.errors import XendbgError


def _size(text: str) -> int:
    """Parse a memory size such as 64M, 1G, 65536."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(text[:-1], 0) * units[text[-1]]
    return int(text, 0)


def _add_emu_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--emu",
        metavar="GUEST.elf",
        required=required,
        help="emulate this guest ELF on Unicorn instead of attaching to Xen",
    )
    p.add_argument("--vcpus", type=int, default=1, help="emulated vCPUs (default 1)")
    p.add_argument(
        "--memory", type=_size, default=64 << 20, help="emulated guest RAM, e.g. 64M (default)"
    )


def _add_breakpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--breakpoints",
        choices=("auto", "int3", "spin"),
        default="auto",
        help="software breakpoints: int3 (reported by the hypervisor) or spin (a `jmp $` "
        "found by polling vCPU RIPs, for guests whose traps never reach the debugger, "
        "e.g. Xen PV); auto: int3 where the domain reports int3 events (default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xendbg", description="A VMI debugger for Xen guests (and emulated ones)."
    )
    parser.add_argument("--version", action="version", version=f"xendbg {__version__}")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run an emulated guest for a while and report what it did")
    _add_emu_args(run, required=True)
    run.add_argument("--seconds", type=float, default=1.0, help="how long to run (default 1)")

    serve = sub.add_parser("serve", help="GDB/LLDB remote server for a domain")
    _add_emu_args(serve, required=False)
    serve.add_argument(
        "--port",
        type=int,
        default=1234,
        help="TCP port (default 1234; 0: any); on Xen without --attach, the first of one "
        "port per guest domain",
    )
    serve.add_argument(
        "--attach",
        metavar="DOMAIN",
        help="Xen: serve this domain (id or name) until it is destroyed; without it, every "
        "guest domain, each on its own port, as domains start and stop",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; others print a warning)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="log connections")
    _add_breakpoint_arg(serve)

    lst = sub.add_parser("list", help="list the Xen domains (name, id, type, width, state)")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")

    repl = sub.add_parser(
        "repl",
        help="interactive debugger (the default command)",
        description="Interactive debugger.  When stdin is not a terminal, commands are read "
        "from it line by line (no prompt, no colour).",
    )
    _add_emu_args(repl, required=False)
    repl.add_argument("--attach", metavar="DOMAIN", help="domain id or name to attach to")
    _add_breakpoint_arg(repl)
    repl.add_argument(
        "-x",
        dest="scripts",
        metavar="FILE",
        action="append",
        default=[],
        help="run the commands in FILE first (may be repeated)",
    )
    repl.add_argument("--no-color", action="store_true", help="no colours (NO_COLOR works too)")
    repl.add_argument(
        "--echo", action="store_true", help="echo each script command after the prompt text"
    )
    return parser


SUBCOMMANDS = ("run", "serve", "repl", "list")


def cmd_run(args: argparse.Namespace) -> int:
    from xendbg.backend.emu import EmuDomain

    with EmuDomain(args.emu, vcpus=args.vcpus, memory=args.memory, start_paused=True) as dom:
        print(
            f"emulating {args.emu}: {dom.vcpu_count} vCPU(s), {args.memory >> 20} MiB, "
            f"{dom.word_size * 8}-bit guest"
        )
        dom.unpause()
        time.sleep(args.seconds)
        dom.pause()
        for v in range(dom.vcpu_count):
            regs = dom.get_registers(v)
            print(
                f"vcpu {v}: {dom.vcpu_state(v)}  rip={regs['rip']:#018x} "
                f"rsp={regs['rsp']:#018x} cr3={regs['cr3']:#x}"
            )
        out = dom.console_output().decode("utf-8", "replace")
        print(f"guest console ({len(out)} bytes, port 0xe9):")
        tail = out.splitlines()[-20:]
        for line in tail:
            print(f"  | {line}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from xendbg.frontend.gdbserver.server import serve_domain, warn_if_exposed
    from xendbg.frontend.repl import monitor_factory

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="xendbg: %(message)s"
    )
    warn_if_exposed(args.host)
    if args.emu is None:
        return _serve_xen(args)  # dom0 has no Unicorn: import the emulator only for --emu
    from xendbg.backend.emu import EmuDomain

    def ready(port: int) -> None:
        print(
            f"xendbg: serving {args.emu} on {args.host}:{port} (target remote {args.host}:{port})",
            flush=True,
        )

    # Created paused: the first client sees the guest's very first instruction.
    with EmuDomain(args.emu, vcpus=args.vcpus, memory=args.memory, start_paused=True) as dom:
        serve_domain(
            dom,
            host=args.host,
            port=args.port,
            monitor_factory=monitor_factory([args.emu]),
            release_initial_pause=True,
            ready=ready,
            breakpoints=args.breakpoints,
        )
    return 0


def _serve_xen(args: argparse.Namespace) -> int:
    from xendbg.backend.xen._lib import XenNotAvailable
    from xendbg.errors import Unsupported
    from xendbg.frontend.gdbserver.multi import serve_xen
    from xendbg.frontend.repl import monitor_factory

    def announce(line: str) -> None:
        print(f"xendbg: {line}", flush=True)

    try:
        return serve_xen(
            host=args.host,
            base_port=args.port,
            only=args.attach,
            monitor_factory=monitor_factory([]),
            breakpoints=args.breakpoints,
            announce=announce,
        )
    except XenNotAvailable as exc:
        raise Unsupported(
            "serving Xen domains", f"{exc}; serve an emulated guest with --emu GUEST.elf instead"
        ) from exc


def cmd_repl(args: argparse.Namespace) -> int:
    from xendbg.frontend.repl import run as run_repl
    from xendbg.frontend.repl.target import EmuTarget, Target, XenTarget

    target: Target
    if args.emu is None:
        from xendbg.errors import Unsupported

        try:
            target = XenTarget()
        except Unsupported as exc:  # no Xen here (XenNotAvailable says why)
            raise Unsupported(
                "attaching to Xen domains", f"{exc}; emulate a guest with --emu GUEST.elf instead"
            ) from exc
    else:
        target = EmuTarget(args.emu, vcpus=args.vcpus, memory=args.memory)
    return run_repl(
        target,
        symbol_files=[args.emu] if args.emu else [],
        scripts=args.scripts,
        no_color=args.no_color,
        echo=args.echo,
        attach=args.attach,
        breakpoints=args.breakpoints,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] not in (*SUBCOMMANDS, "-h", "--help", "--version"):
        words = ["repl", *words]  # bare `xendbg [--emu …]` is the REPL
    args = parser.parse_args(words)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "repl":
            return cmd_repl(args)
        if args.command == "list":
            from xendbg.frontend.listing import cmd_list

            return cmd_list(args)
        parser.print_help()
        return 2
    except XendbgError as e:
        print(f"xendbg: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
