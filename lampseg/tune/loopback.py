"""A Ray started by lampseg listens on loopback only. Light on purpose: ``__main__`` imports it for every
subcommand (``tune`` and ``hydra/launcher=ray`` start Ray), before it knows whether Ray is needed."""
from __future__ import annotations

import os

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local Ray uses 127.0.0.1 only


def local_ray_on_loopback() -> None:
    """Make a Ray started by this process bind to and advertise 127.0.0.1 only: Ray's single-machine mode
    (its default on macOS and Windows), so nothing listens beyond loopback unless a cluster is joined."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
    try:  # Ray reads the variable at import; a Ray imported earlier in this process needs the constant too
        from ray._private import ray_constants  # lazy: Ray/Optuna take seconds to import

        ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ENV].lower() in ("1", "true")
    except (ImportError, AttributeError):
        pass
