"""The QEMU provider: environments are QEMU guests (libvirt domains) on the node."""

from providers.qemu.provider import QemuProvider

__all__ = ["QemuProvider"]
