"""Several processes per GPU (doctor's and the GPU check's distributed steps on a one-GPU machine): each
process's GPU wraps around the visible ones, and ``parallel.backend=auto`` takes gloo, which NCCL's refusal
of two ranks on one device leaves as the only backend."""
from __future__ import annotations

import pytest
import torch

from lampseg.parallel import distributed


@pytest.mark.parametrize("gpus, local_rank, local_world, gpu, shared", [
    (1, 1, 2, 0, True), (2, 3, 4, 1, True), (4, 3, 4, 3, False), (8, 0, 1, 0, False), (0, 1, 2, 0, True)])
def test_processes_wrap_around_the_visible_gpus(monkeypatch, gpus, local_rank, local_world, gpu, shared):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert distributed.local_gpu() == gpu
    assert distributed.gpus_shared() is shared
