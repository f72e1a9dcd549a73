"""Bounds of the update agent that keep a hostile or broken publisher from hanging or locking out a device.

* Downloads: an overall deadline and a minimum rate, so a server that trickles one byte at a
  time (TUF's "slow retrieval" attack) cannot keep an update, and its lock, alive for ever.
* Versions: at most 2^53 - 1 (the largest integer every JSON reader holds exactly) and at most
  ``max_version_jump`` above the highest version the device trusted, so one signed bundle with
  a version of 10^30 cannot make every later real version look like a rollback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compactai.bundle.manifest import BundleRefused
from compactai.errors import ParameterError

MAX_VERSION = 2**53 - 1
_OPTIONS = {"download_deadline_s": " (--download-deadline)", "min_download_rate": " (--min-download-rate)",
            "max_version_jump": " (--max-version-jump)"}


@dataclass
class UpdateLimits:
    """How long and how slow a download may be, and how far a version may jump."""

    download_deadline_s: float = 1800.0  # the whole download: metadata and every file
    min_download_rate: float = 1024.0  # bytes/s, averaged over each rate window; 0 = no minimum
    rate_window_s: float = 30.0  # also the longest silence tolerated from the server
    connect_timeout_s: float = 30.0
    max_version_jump: int | None = 2**32  # above the highest trusted version; None = only MAX_VERSION

    def check(self) -> UpdateLimits:
        """Raise ParameterError on a value that would disable a bound by accident (NaN, negative, ...)."""
        for name in ("download_deadline_s", "rate_window_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ParameterError(f"The '{name}' of UpdateLimits{_OPTIONS.get(name, '')} must be a finite number "
                                     f"> 0. Got {value!r} instead.")
        if not (math.isfinite(self.min_download_rate) and self.min_download_rate >= 0):
            raise ParameterError("The 'min_download_rate' of UpdateLimits (--min-download-rate) must be a finite "
                                 "number >= 0 (bytes/s). "
                                 f"Got {self.min_download_rate!r} instead.")
        if self.max_version_jump is not None and not (isinstance(self.max_version_jump, int)
                                                      and self.max_version_jump >= 1):
            raise ParameterError("The 'max_version_jump' of UpdateLimits must be an integer >= 1 or None. "
                                 f"Got {self.max_version_jump!r} instead.")
        return self

    def check_version(self, version: int, highest_trusted: int) -> None:
        """Refuse (reason ``version-bound``) a version that would raise the rollback floor out of reach."""
        jump = self.max_version_jump
        highest_allowed = MAX_VERSION if jump is None else min(MAX_VERSION, highest_trusted + jump)
        if version <= highest_allowed:
            return
        bound = "" if jump is None else f" and at most {jump} above {highest_trusted}, the highest version this " \
                                        "device trusted"
        raise BundleRefused("version-bound", (
            f"Version {version} is out of bounds: versions must be at most 2^53-1 ({MAX_VERSION}){bound}, so that "
            "one bundle cannot make every later version look like a rollback. Re-sign it with a version of at "
            f"most {highest_allowed}" + ("" if jump is None else ", or raise --max-version-jump") + "."))
