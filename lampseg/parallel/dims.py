"""Parallel dimensions of a run: data-parallel replicas x pipeline stages x spatial slabs = processes.

    torchrun --nproc_per_node 4 -m lampseg train parallel=pipeline parallel.dp=2 parallel.pp=2
    torchrun --nproc_per_node 4 -m lampseg train parallel=spatial parallel.dp=2 parallel.sp=2
    torchrun --nproc_per_node 4 -m lampseg train parallel=spatial parallel.pp=2 parallel.sp=2

``ParallelDims.from_config`` resolves ``parallel.dp`` (null: WORLD_SIZE / (pp x sp)) and checks that
``dp * pp * sp == WORLD_SIZE`` before any heavy work; ``build_mesh`` lays the processes out as a 3D device
mesh ``(dp, pp, sp)``: the slabs of one volume are consecutive ranks (their halo exchanges are the most
frequent traffic, so they stay inside a node first), then the stages of one pipeline, then the replicas.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lampseg.config import ConfigError, enum_value
from lampseg.runtime import distributed

MODES = ("single", "ddp", "pipeline", "spatial")


@dataclass
class ParallelDims:
    """How the processes of a run are used.

    Args:
        dp: data-parallel replicas (each sees a different shard of every global batch).
        pp: pipeline stages per replica.
        sp: spatial slabs per volume (``parallel=spatial``): processes that split one volume.
        world: processes in the job (1 without torchrun).
        engine: ``pipelining`` (one stage per process), ``gpipe`` (all stages in this process) or None.
    """

    dp: int
    pp: int
    world: int
    engine: str | None = None
    mesh: object | None = field(default=None, repr=False)
    sp: int = 1
    _replicas: object | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.dp < 1 or self.pp < 1 or self.sp < 1:
            raise ConfigError(f"config keys 'parallel.dp', 'parallel.pp', 'parallel.sp': expected positive "
                              f"integers, got {self.dp}, {self.pp} and {self.sp}")
        processes = self.dp * self.stage_processes * self.sp
        if processes != self.world:
            keys = ["dp"] + (["pp"] if self.staged else []) + (["sp"] if self.spatial else [])
            degrees = {"dp": self.dp, "pp": self.pp, "sp": self.sp}
            need = f"{' x '.join(str(degrees[k]) for k in keys)} = {processes}" if len(keys) > 1 \
                else f"{processes}"
            named = " x ".join(f"'parallel.{k}'" for k in keys)
            raise ConfigError(
                f"config keys {named}: {need} processes needed, but WORLD_SIZE is {self.world}; launch with "
                f"`torchrun --nproc_per_node {processes} -m lampseg ...` or change "
                f"{' / '.join('parallel.' + k for k in keys)}")

    @classmethod
    def from_config(cls, parallel_cfg, world: int) -> ParallelDims:
        """Resolve ``parallel.*`` against a job of ``world`` processes.

        Raises:
            ConfigError: naming the key when the degrees do not multiply to ``world`` or a mode does not
                support them.
        """
        p = parallel_cfg
        if p.name not in MODES:
            raise ConfigError(f"config key 'parallel.name': expected one of {'|'.join(MODES)}, "
                              f"got {p.name!r}")
        sp = int(p.sp)
        # stages of slabs (parallel=spatial parallel.pp=P) run one stage per process, as pipelining does
        engine = enum_value(p.engine) if p.name == "pipeline" or (p.name == "spatial" and p.pp > 1) else None
        if p.name != "spatial" and sp != 1:
            raise ConfigError(f"config key 'parallel.sp': {sp} slabs need parallel=spatial (got "
                              f"parallel={p.name}); DP x SP is parallel=spatial parallel.dp=D")
        if p.name == "spatial" and engine == "gpipe":
            raise ConfigError("config key 'parallel.engine': stages of slabs (parallel=spatial "
                              "parallel.pp>1) run one stage per process; use parallel.engine=pipelining")
        if p.name not in ("pipeline", "spatial") and p.pp != 1:
            raise ConfigError(f"config key 'parallel.pp': {p.pp} stages need parallel=pipeline "
                              f"(got parallel={p.name}); DP x PP is parallel=pipeline parallel.dp=D")
        if p.name == "single" and world > 1:
            raise ConfigError(f"config key 'parallel': parallel=single is one process, but WORLD_SIZE is "
                              f"{world}; use parallel=ddp for data parallelism over the {world} processes")
        if engine == "gpipe" and (world > 1 or (p.dp or 1) > 1):
            raise ConfigError("config key 'parallel.engine': gpipe runs all stages in one process and "
                              "has no data parallelism; use parallel.engine=pipelining under torchrun "
                              "for DP x PP")
        per_replica = (p.pp if engine == "pipelining" else 1) * sp
        dp = p.dp if p.dp is not None else max(world // per_replica, 1)
        return cls(dp=int(dp), pp=int(p.pp), world=world, engine=engine, sp=sp)

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def staged(self) -> bool:
        """One pipeline stage per process (the ``pipelining`` engine)."""
        return self.engine == "pipelining"

    @property
    def stage_processes(self) -> int:
        """Processes per pipeline: ``pp`` for one stage per process, else 1."""
        return self.pp if self.staged else 1

    @property
    def spatial(self) -> bool:
        """Volumes are split into slabs over ``sp`` processes."""
        return self.sp > 1

    def build_mesh(self, device_type: str):
        """The ``(dp, pp, sp)`` device mesh of a staged or spatial run (None otherwise); kept on
        ``self.mesh``."""
        if (self.staged or self.spatial) and self.mesh is None:
            self.mesh = init_device_mesh(device_type, (self.dp, self.stage_processes, self.sp),
                                         mesh_dim_names=("dp", "pp", "sp"))
        return self.mesh

    @property
    def sp_rank(self) -> int:
        """Which slab of each volume this process holds (0 when not split)."""
        return self.mesh.get_local_rank("sp") if self.spatial and self.mesh is not None else 0

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The processes that hold the slabs of this process's volumes (None: not split)."""
        return self.mesh.get_group("sp") if self.mesh is not None and self.spatial else None

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """This process's pipeline (None: the whole job)."""
        return self.mesh.get_group("pp") if self.mesh is not None else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The replicas of this process's stage (None: the whole job, as in plain DDP)."""
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        """The processes that hold copies of this process's parameters and average their gradients: the
        ``dp x sp`` processes of this stage (None: the whole job, as in plain DDP or DP x SP)."""
        if self.mesh is None or not self.staged:
            return None
        if not self.spatial:
            return self.dp_group
        if self._replicas is None:
            self._replicas = self.mesh["dp", "sp"]._flatten("dp_sp").get_group()
        return self._replicas

    @property
    def dp_rank(self) -> int:
        """Which replica this process belongs to: its shard of each batch and of the validation cases."""
        if self.mesh is not None:
            return self.mesh.get_local_rank("dp")
        return distributed.rank() if self.dp_enabled else 0

    def dp_mean(self, value: float, device: torch.device | str = "cpu") -> float:
        """The mean of ``value`` over the data-parallel replicas (a collective on every rank; ``device``:
        where the backend reduces, e.g. a CUDA device for NCCL)."""
        if not self.dp_enabled:
            return value
        box = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(box, group=self.dp_group)
        return float(box) / self.dp

    def dp_gather(self, items: list) -> list:
        """Every replica's ``items``, concatenated in replica order (a collective on every rank)."""
        if not self.dp_enabled:
            return list(items)
        parts: list = [None] * self.dp
        dist.all_gather_object(parts, list(items), group=self.dp_group)
        return [item for part in parts for item in part]

    def to_dict(self) -> dict:
        """``world_size``, ``dp``, ``pp``, ``sp`` and the communication ``backend`` (None for one process)."""
        backend = str(dist.get_backend()) if dist.is_initialized() else None
        return {"world_size": self.world, "dp": self.dp, "pp": self.pp if self.engine else 1, "sp": self.sp,
                "backend": backend}


def resolve_dims(cfg) -> ParallelDims:
    """The run's parallel dimensions; joins the torchrun job first when there is one.

    A run of one stage per process must be launched by torchrun; any other mode under torchrun needs
    ``parallel=ddp`` (copies of a single-process run would overwrite each other's files).

    Raises:
        ConfigError: for the pipelining engine outside torchrun, or degrees that do not match WORLD_SIZE.
    """
    p = cfg.parallel
    joined = distributed.init_from_env()
    staged = p.name == "pipeline" and enum_value(p.engine) == "pipelining"
    if p.name == "spatial" and not joined:
        processes = (p.dp or 1) * p.pp * p.sp
        raise ConfigError(f"config key 'parallel': parallel=spatial splits each volume over processes; "
                          f"launch with `torchrun --nproc_per_node {processes} -m lampseg ...`")
    if staged and not joined:
        raise ConfigError(f"config key 'parallel.engine': 'pipelining' runs one stage per process; launch "
                          f"with `torchrun --nproc_per_node {(p.dp or 1) * p.pp} -m lampseg ...`, or set "
                          f"parallel.engine=gpipe to run all {p.pp} stages in this process")
    return ParallelDims.from_config(p, distributed.world_size())
