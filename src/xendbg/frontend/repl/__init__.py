"""The standalone REPL front-end (`xendbg repl`) and gdb's `monitor` commands."""

from xendbg.frontend.repl.app import monitor_factory, run
from xendbg.frontend.repl.commands import REGISTRY, execute
from xendbg.frontend.repl.debugger import Debugger

__all__ = ["REGISTRY", "Debugger", "execute", "monitor_factory", "run"]
