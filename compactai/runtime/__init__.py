"""Running bundles on a device: the secure over-the-air update agent (see docs/bundle.md)."""

from compactai.runtime.agent import ACTIVATION_STEPS, UpdateAgent, UpdateResult
from compactai.runtime.events import UpdateEvents
from compactai.runtime.fleet import PacedFetcher, fleet_status, update_from_repository
from compactai.runtime.limits import MAX_VERSION, UpdateLimits
from compactai.runtime.probation import HealthMonitor, ProbationPolicy
from compactai.runtime.state import InstallState, load_state

__all__ = [
    "ACTIVATION_STEPS", "MAX_VERSION", "HealthMonitor", "InstallState", "PacedFetcher", "ProbationPolicy",
    "UpdateAgent", "UpdateEvents", "UpdateLimits", "UpdateResult", "fleet_status", "load_state",
    "update_from_repository",
]
