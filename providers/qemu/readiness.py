"""Whether libvirt, QEMU, an accelerator and a guest image are here, for ``Info``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import libvirt

from common.errors import VendettaError
from providers.base import IMAGES, PERMITTED, Readiness, failed_check
from providers.qemu.errors import IMAGE_HINT
from providers.qemu.images import image_paths, images, state_dir_problem, where
from providers.qemu.kvm import known, probe_kvm
from providers.threaded import EngineClient


class ReadinessCheck:
    """Readiness of one provider; the KVM test boot runs once, in the background."""

    def __init__(
        self,
        client: EngineClient[libvirt.virConnect],
        uri: str,
        image_dirs: Sequence[Path],
        state_dir: Path,
    ) -> None:
        self._libvirt = client
        self._uri = uri
        self._image_dirs = image_dirs
        self._state_dir = state_dir
        self._kvm_probe: asyncio.Future[tuple[bool, str]] | None = None

    async def check(self) -> Readiness:
        try:
            version = await self._libvirt.call("checking libvirt", lambda c: c.getLibVersion())
            hv = await self._libvirt.call("checking libvirt", lambda c: c.getVersion())
        except VendettaError as exc:
            return Readiness(ready=False, detail=exc.message, failed=failed_check(exc))
        found = await asyncio.to_thread(images, self._image_dirs)
        kernel = (
            (await asyncio.to_thread(image_paths, self._image_dirs, found[0]))[0] if found else None
        )
        probed = await self._kvm_known(kernel)

        def dotted(v: int) -> str:
            return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"

        if probed is None:
            accel, mode = "checking whether KVM runs guests here (a test boot of up to 10 s)", ""
        elif probed[0]:
            accel = mode = "KVM"
        else:
            accel = f"running under emulation (TCG), slower: {probed[1]}"
            mode = "emulation (TCG)"
        detail = f"libvirt {dotted(version)}, QEMU {dotted(hv)} at {self._uri}; {accel}"
        if problem := await asyncio.to_thread(state_dir_problem, self._state_dir):
            return Readiness(
                ready=False,
                detail=f"{detail}; {problem}",
                version=dotted(version),
                failed=PERMITTED,
                mode=mode,
            )
        if not found:
            return Readiness(
                ready=False,
                detail=f"{detail}; no guest image in {where(self._image_dirs)}: {IMAGE_HINT}",
                version=dotted(version),
                failed=IMAGES,
                mode=mode,
            )
        return Readiness(
            ready=True,
            detail=f"{detail}; images: {', '.join(found)}",
            version=dotted(version),
            images=tuple(found),
            mode=mode,
        )

    async def _kvm_known(self, kernel: Path | None) -> tuple[bool, str] | None:
        """The KVM probe's answer if it comes within a second; else None, and it goes
        on in the background: readiness answers Info, which must not wait 10 s."""
        if (answer := known(kernel)) is not None:
            return answer
        if self._kvm_probe is None or self._kvm_probe.done():
            self._kvm_probe = asyncio.ensure_future(asyncio.to_thread(probe_kvm, kernel))
        try:
            return await asyncio.wait_for(asyncio.shield(self._kvm_probe), 1.0)
        except TimeoutError:
            return None
