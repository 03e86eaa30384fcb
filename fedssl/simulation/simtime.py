"""Simulated time: how long a client's round would take on its device.

A client's round is its download, its local steps and its upload, one after the
other: `download_bytes / downlink + steps * samples_per_step / speed +
upload_bytes / uplink` seconds (FedScale's completion time, Lai et al. ICML
2022, with compute speed in samples per second). A synchronous round lasts as
long as its slowest kept client, or until its deadline where the server gave up
on someone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedssl.simulation.profiles import DeviceProfile


@dataclass(frozen=True)
class Work:
    """One client's round in simulated seconds.

    Attributes:
        download: seconds to receive the payload.
        step: seconds per local step (its samples / the device's speed).
        steps: the local steps of the full budget.
        upload: seconds to send the update.
    """

    download: float
    step: float
    steps: int
    upload: float

    def seconds(self, steps: int | None = None) -> float:
        """The round's seconds with `steps` local steps (default: the full budget)."""
        return self.download + (self.steps if steps is None else steps) * self.step + self.upload

    def steps_within(self, deadline: float) -> int:
        """The most local steps (at most the budget) that fit `deadline`, with the
        download and the upload; 0 where not even one does."""
        spare = deadline - self.download - self.upload
        if spare < self.step:
            return 0
        return min(self.steps, math.floor(spare / self.step) if self.step > 0 else self.steps)


def client_work(profile: DeviceProfile, download_bytes: int, upload_bytes: int, steps: int,
                samples_per_step: int) -> Work:
    return Work(download=download_bytes / profile.downlink, step=samples_per_step / profile.speed, steps=steps,
                upload=upload_bytes / profile.uplink)
