"""lampseg's error types: every problem lampseg diagnoses is a ``LampsegError`` whose message names the
file or config key and what was expected. The CLI prints it as one paragraph (no traceback unless
``debug=true``) and exits non-zero; anything else escaping is a bug."""
from __future__ import annotations


class LampsegError(Exception):
    """Base of lampseg's diagnosed errors."""


class TrainingDiverged(LampsegError):
    """Too many consecutive optimiser steps had a non-finite loss or gradients (``trainer.max_nan_steps``)."""
