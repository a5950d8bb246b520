"""Several processes per GPU (doctor's and the GPU check's distributed steps on a one-GPU machine): each
process's GPU wraps around the visible ones, and ``parallel.backend=auto`` takes gloo, which NCCL's refusal
of two ranks on one device leaves as the only backend."""
from __future__ import annotations

import pytest
import torch

from lampseg.runtime import distributed


@pytest.mark.parametrize("gpus, local_rank, local_world, gpu, shared", [
    (1, 1, 2, 0, True), (2, 3, 4, 1, True), (4, 3, 4, 3, False), (8, 0, 1, 0, False), (0, 1, 2, 0, True)])
def test_processes_wrap_around_the_visible_gpus(monkeypatch, gpus, local_rank, local_world, gpu, shared):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert distributed.local_gpu() == gpu
    assert distributed.gpus_shared() is shared


def test_nccl_on_shared_gpus_is_a_config_error(monkeypatch):
    """NCCL refuses two ranks on one GPU: an explicit nccl backend there fails before joining, naming the
    key (not later, at the first collective, as a "rank died" message)."""
    from lampseg.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *_: None)
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="config key 'parallel.backend'.*NCCL refuses two ranks on one GPU"):
        distributed.init_from_env(backend="nccl")
