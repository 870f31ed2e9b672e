"""The LXD provider: environments are system containers on the node's LXD daemon."""

from providers.lxd.provider import LxdProvider

__all__ = ["LxdProvider"]
