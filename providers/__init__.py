"""Providers prepare environments on the local node: docker, lxd, qemu.

Providers know nothing of gRPC, transports or the coordinator; they take and
return the plain types of ``providers.base`` and raise ``common.errors``.
"""
