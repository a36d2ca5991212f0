"""The one root of every error the harness (``pyvirtiofsd.vm``) raises.

    VmError
     +-- KernelBuildError     (kernel.py)   a guest kernel could not be built
     +-- InitramfsError       (initramfs.py) the initramfs or a guest program
     +-- DebianBuildError     (debian.py)   the Debian userland
     +-- AgentError           (agent.py)    the agent channel failed
     |    +-- GuestCommandError             a checked guest command failed
     +-- MachineError         (machine.py)  the guest could not be started or driven
     +-- SwiotlbError         (swiotlb.py)  guest and host disagree about a window

Callers (the CLI, tests, benchmarks) catch ``VmError``; each subclass keeps
its cause (``raise ... from err``). Errors of the layers below (the DMA
core's ``WindowError``) are wrapped where the harness meets them.
"""

from __future__ import annotations


class VmError(RuntimeError):
    """Something the test-guest harness was asked to do failed."""
