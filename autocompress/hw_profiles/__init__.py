"""Hardware profiles: where latency figures come from.

The ``host`` profile is this machine, measured directly (see ``evaluators.latency``);
:func:`describe_host` records what that machine is, so every logged latency names its hardware.
A hardware profile file (:mod:`.profile`) holds a lookup table of isolated operator latencies
measured on one machine and runtime (:mod:`.measure`), and :func:`predict` turns a compressed model
into a latency prediction from it (:mod:`.predictor`); :mod:`.validate` checks predictions against
end-to-end measurements. Profiles shipped with autocompress live next to this file as ``*.json``.
"""

from autocompress.hw_profiles.host import describe_host
from autocompress.hw_profiles.predictor import (
    Prediction,
    ProfileMismatchWarning,
    UnpredictableSignature,
    fit_overhead,
    predict,
    predict_signatures,
)
from autocompress.hw_profiles.profile import (
    LutEntry,
    OpSignature,
    Profile,
    ProfileError,
    load_profile,
    save_profile,
    shipped_profiles,
)

__all__ = [
    "LutEntry",
    "OpSignature",
    "Prediction",
    "Profile",
    "ProfileError",
    "ProfileMismatchWarning",
    "UnpredictableSignature",
    "describe_host",
    "fit_overhead",
    "load_profile",
    "predict",
    "predict_signatures",
    "save_profile",
    "shipped_profiles",
]
