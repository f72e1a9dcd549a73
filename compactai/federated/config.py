"""The settings of one federated run, checked before Flower or any model is loaded.

Every bad value fails here in one line (exit 2 from the CLI): fewer than two clients, no round,
a fraction that samples no client, a Dirichlet alpha <= 0, an unknown strategy or compression.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from compactai.errors import ParameterError, UnknownNameError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian")
COMPRESSIONS = ("none", "fp16", "int8")
DP_SIDES = ("server", "client")
ENGINES = ("simulation", "deployment")


@dataclass
class FederatedConfig:
    """What a federated run does. ``partition`` is ``iid`` or ``label-skew:ALPHA`` (Dirichlet).

    ``fraction_fit`` of the clients train each round (Flower samples ``int(fraction * clients)``
    of them); ``fraction_evaluate`` of them score the global model on their held-out data.
    ``dp_clip``/``dp_noise`` turn on Flower's fixed-clipping Gaussian differential privacy
    (``dp_side`` says whether the server or each client clips).
    """

    clients: int = 10
    rounds: int = 10
    strategy: str = "fedavg"
    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0
    partition: str = "label-skew:0.3"
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    proximal_mu: float = 0.1  # FedProx's proximal weight (only used by fedprox)
    server_lr: float = 0.03  # FedAdam's server learning rate (eta)
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_side: str = "server"
    compression: str = "none"
    secagg: bool = False
    holdout: float = 0.2  # each client's share kept out of its training, for federated evaluation
    seed: int = 0

    def validate(self) -> FederatedConfig:
        """Raise a one-line error naming the first bad setting; returns self."""
        if not isinstance(self.clients, int) or self.clients < 2:
            raise ParameterError(f"--clients must be at least 2 (federated learning needs several clients); "
                                 f"got {self.clients}.")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ParameterError(f"--rounds must be at least 1; got {self.rounds}.")
        if self.strategy not in STRATEGIES:
            raise UnknownNameError(f"Unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        for flag, fraction in (("--fraction-fit", self.fraction_fit), ("--fraction-evaluate", self.fraction_evaluate)):
            if not (math.isfinite(fraction) and 0 < fraction <= 1):
                raise ParameterError(f"{flag} must be in (0, 1]; got {fraction}.")
            if int(fraction * self.clients) < 1:
                raise ParameterError(
                    f"{flag} {fraction} selects no client out of {self.clients} (Flower samples "
                    f"int({fraction} x {self.clients}) = 0); use at least {1 / self.clients:.3g}.")
        self.alpha()  # checks the partition text
        for flag, value, low in (("--local-epochs", self.local_epochs, 1), ("--batch-size", self.batch_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ParameterError(f"{flag} must be an integer >= {low}; got {value}.")
        for flag, rate in (("--lr", self.lr), ("--proximal-mu", self.proximal_mu), ("--server-lr", self.server_lr)):
            if not (math.isfinite(rate) and rate >= 0) or (flag != "--proximal-mu" and rate == 0):
                raise ParameterError(f"{flag} must be a positive number; got {rate}.")
        if (self.dp_clip is None) != (self.dp_noise is None):
            raise ParameterError("Differential privacy needs both --dp-clip C and --dp-noise Z (or neither); "
                                 f"got clip {self.dp_clip}, noise {self.dp_noise}.")
        if self.dp_clip is not None and not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
            raise ParameterError(f"--dp-clip must be a positive L2 norm; got {self.dp_clip}.")
        if self.dp_noise is not None and not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
            raise ParameterError(f"--dp-noise must be a noise multiplier >= 0; got {self.dp_noise}.")
        if self.dp_side not in DP_SIDES:
            raise UnknownNameError(f"Unknown --dp-side {self.dp_side!r}; choose server or client.")
        if self.compression not in COMPRESSIONS:
            raise UnknownNameError(f"Unknown --compress {self.compression!r}; choose one of {', '.join(COMPRESSIONS)}.")
        if not (0 < self.holdout < 1):
            raise ParameterError(f"--holdout must be in (0, 1); got {self.holdout}.")
        return self

    def alpha(self) -> float | None:
        """The Dirichlet alpha of ``label-skew:ALPHA``, or None for ``iid``."""
        text = self.partition.strip()
        if text == "iid":
            return None
        name, _, value = text.partition(":")
        if name != "label-skew":
            raise ParameterError(f"--partition must be 'iid' or 'label-skew:ALPHA' (e.g. label-skew:0.3); "
                                 f"got {self.partition!r}.")
        try:
            alpha = float(value)
        except ValueError:
            alpha = float("nan")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ParameterError(f"The Dirichlet alpha of --partition must be a number > 0 (smaller: more skew); "
                                 f"got {value!r}.")
        return alpha

    @property
    def privacy(self) -> dict[str, Any]:
        """The privacy settings as plain data for results.json."""
        on = self.dp_clip is not None
        return {"differential_privacy": on, "clipping": "fixed" if on else None,
                "side": self.dp_side if on else None, "clipping_norm": self.dp_clip,
                "noise_multiplier": self.dp_noise, "secure_aggregation": self.secagg}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
