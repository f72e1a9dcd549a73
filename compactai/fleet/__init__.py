"""Fleet updates on The Update Framework (python-tuf): a signed model repository with separate roles,
threshold signatures, key rotation and revocation, and freeze detection (see docs/fleet.md).

The publisher side (:class:`Repository`) writes TUF metadata with python-tuf's Metadata API; the
device side (:class:`FleetClient`) refreshes it with ``tuf.ngclient.Updater`` and downloads the
newest bundle of a model and channel, which the update agent (compactai.runtime) then checks and
installs. Layer: above compactai.bundle, below compactai.runtime and the CLI.
"""

from compactai.fleet.device import FleetClient, TargetChoice, metadata_staleness, refusal
from compactai.fleet.keys import FleetKey, load_key, load_keys, resolve_keyid
from compactai.fleet.layout import DEFAULT_CHANNEL, parse_duration, target_path
from compactai.fleet.repository import Repository

__all__ = [
    "DEFAULT_CHANNEL", "FleetClient", "FleetKey", "Repository", "TargetChoice", "load_key", "load_keys",
    "metadata_staleness", "parse_duration", "refusal", "resolve_keyid", "target_path",
]
