"""The Xen backend: ctypes bindings (one module per Xen library), the sans-I/O
vm_event ring, register contexts, domain listing and ``XenDomain``.

Importing this package loads no library: each handle loads its library by soname
when opened, and raises ``XenNotAvailable`` (an ``Unsupported``) where Xen is absent.
"""
