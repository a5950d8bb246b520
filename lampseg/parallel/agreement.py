"""Ranks of a split model that agree before every collective of an inference pass, so that one rank's
failure stops every rank at the same point (``spatial``'s halo exchanges and normalisation all-reduces call
``agree``; ``engine.inference.attempt`` runs a pass within ``agreeing``).

    with agreeing(group):
        try:
            logits = model(x)          # each collective first all-reduces the ranks' failure codes
        except PeerFailed:             # another rank failed and said so: stop here, as it did
            ...
        except torch.OutOfMemoryError:
            report_failure(device, OUT_OF_MEMORY)   # the others are at their next check
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

OUT_OF_MEMORY, ERROR = 1, 2  # what a failing rank reports within ``agreeing`` (the worst one wins)


class PeerFailed(RuntimeError):
    """Raised inside ``agreeing``: another rank of the group failed and said so (``code``: ``OUT_OF_MEMORY``
    or ``ERROR``), so this rank stops its pass at the same point and the group stays usable."""

    def __init__(self, code: int):
        what = "ran out of memory" if code == OUT_OF_MEMORY else "raised an error"
        super().__init__(f"another rank of the slabs' group {what}")
        self.code = code


class _Agreement:
    """``agreeing``'s state: the group whose ranks check each other before every collective."""

    group = None


_AGREEMENT = _Agreement()


@contextmanager
def agreeing(group):
    """Within the block, every halo exchange and normalisation all-reduce of the split model is preceded by
    a one-number all-reduce of the ranks' state, so that a rank that fails (``report_failure``) stops the
    others at their next collective (``PeerFailed``) instead of leaving them waiting for it until the
    collective timeout. Inference only (the backward's collectives are not checked)."""
    previous, _AGREEMENT.group = _AGREEMENT.group, group
    try:
        yield
    finally:
        _AGREEMENT.group = previous


def _check(device: torch.device, code: int = 0) -> int:
    """Within ``agreeing``: the worst failure code over the group (this rank's ``code``); 0 outside."""
    if _AGREEMENT.group is None:
        return 0
    flag = torch.tensor([code], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_AGREEMENT.group)
    return int(flag.item())


def agree(device: torch.device) -> None:
    """Before a collective within ``agreeing``: raise ``PeerFailed`` when another rank has failed."""
    code = _check(device)
    if code:
        raise PeerFailed(code)


def report_failure(device: torch.device, code: int) -> None:
    """Within ``agreeing``, on the rank that failed: tell the others (they are at their next check)."""
    _check(device, code)


def agreed_outcome(device: torch.device) -> int:
    """Within ``agreeing``, after a pass that succeeded here: the worst failure code of the group (0: every
    rank succeeded; a rank that failed after the last collective tells the others here)."""
    return _check(device)
