"""xendbg: a VMI debugger for Xen guests."""

__version__ = "0.1.0"
