"""Hardware profiles: where latency figures come from.

The ``host`` profile is this machine, measured directly (see ``evaluators.latency``);
:func:`describe_host` records what that machine is, so every logged latency names its hardware.
"""

from autocompress.hw_profiles.host import describe_host

__all__ = ["describe_host"]
