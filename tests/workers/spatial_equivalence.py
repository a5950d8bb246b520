"""torchrun worker: a U-Net split into slabs (``parallelize`` under ``parallel=spatial``) gives the unsplit
model's logits, loss and gradients, alone (dp=1) and with data parallelism (dp x sp = WORLD_SIZE), and whole
outputs for inputs whose slabs differ in length. Float64, so that any real difference stands out from
rounding. With 4 processes also two pipeline stages of two slabs each (sp=2 x pp=2, ``torch.distributed.
pipelining``, two micro-batches), with 8 also two replicas of that (dp=2 x sp=2 x pp=2). Prints one JSON
line per case on rank 0.

    torchrun --nproc_per_node 4 --master_addr 127.0.0.1 --master_port PORT \
        tests/workers/spatial_equivalence.py
"""
import copy
import json

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lampseg.config import Config
from lampseg.model.losses import Targets, build_loss
from lampseg.model.unet import build_model
from lampseg.parallel.dims import ParallelDims
from lampseg.parallel.parallelize import inference_module, parallel_loss, parallelize
from lampseg.parallel.slabs import slab
from lampseg.planner.layout import plan_split

LABELS = {0: "background", 1: "a", 2: "b"}
# (norm, residual units, loss, regions, checkpoint): MONAI's residual U-Net with instance norm and Dice + CE
# (softmax), and the plain U-Net with group norm, Dice + focal over nested sigmoid regions and every block
# recomputed in the backward (its halo exchanges and all-reduces run again).
VARIANTS = [("instance", 2, "dice_ce", None, "none"),
            ("group", 0, "dice_focal", {"ab": [1, 2], "b": [2]}, "block")]


def probe_config(res_units: int, norm: str, parallel: dict):
    """The config of a small probe U-Net (8-16-32 channels, two levels) under ``parallel``."""
    cfg = OmegaConf.structured(Config)
    cfg.model.merge_with({"name": "probe", "channels": [8, 16, 32], "strides": [2, 2], "kernel_size": 3,
                          "num_res_units": res_units, "norm": norm, "dropout": 0.0})
    cfg.parallel.merge_with({"name": "spatial", **parallel})
    return cfg


def probe_problem(cfg, regions, samples: int):
    """A float64 probe model (seed 0), its unsplit copy, the loss, the targets and a random batch."""
    targets = Targets.from_config(LABELS, regions)
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, targets.out_channels).double()
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(samples, 2, 32, 24, 16, generator=generator, dtype=torch.float64)
    target = targets.loss_target(torch.randint(0, 3, (samples, 1, 32, 24, 16), generator=generator))
    return model, copy.deepcopy(model), build_loss(cfg.optim, targets), targets, image, target


def max_rel_error(got: torch.Tensor, want: torch.Tensor, scale: float) -> float:
    """Largest difference relative to ``want``'s largest entry (at least ``scale``: gradients that are zero
    analytically, such as a bias before a normalisation, come out as rounding noise)."""
    return float((got - want).abs().max() / max(float(want.abs().max()), scale))


def case(dp: int, sp: int, norm: str, res_units: int, loss_name: str, regions, checkpoint: str) -> dict:
    world = dist.get_world_size()
    cfg = probe_config(res_units, norm, {"dp": dp, "sp": sp, "checkpoint": checkpoint})
    cfg.data.batch_size, cfg.optim.loss, cfg.trainer.precision = 2, loss_name, "fp32"
    model, reference, loss_fn, targets, image, target = probe_problem(cfg, regions, 2)

    ref_logits = reference(image)
    ref_loss = loss_fn(ref_logits, target)
    ref_loss.backward()

    dims = ParallelDims(dp=dp, pp=1, world=world, sp=sp)
    plan = plan_split(cfg, 2, targets.out_channels, [2, 32, 24, 16], "cpu")
    net = parallelize(model, dims, plan, torch.device("cpu"), cfg.trainer.precision, cfg.model)
    replica = slice(dims.dp_rank * 2 // dp, (dims.dp_rank + 1) * 2 // dp)  # this replica's batch share
    logits = net(slab(image[replica], dims.sp_group, 4))  # each rank is fed its slab (data.sampling.Slab)
    loss = parallel_loss(loss_fn, dims)(logits, slab(target[replica], dims.sp_group, 4))
    loss.backward()
    scale = max(float(p.grad.abs().max()) for p in reference.parameters()) * 1e-6
    grad_error = max(max_rel_error(p.grad, q.grad, scale)
                     for p, q in zip(model.parameters(), reference.parameters()))
    replica_loss = loss.detach().clone()
    dist.all_reduce(replica_loss)  # every slab holds its replica's loss: their mean is the batch's
    infer = inference_module(model, net, dims, 4).eval()
    uneven = image[:, :, :28]  # 7 units of the size divisor 4: slabs of different lengths
    with torch.no_grad():
        whole = infer(uneven)
        ref_whole = reference.eval()(uneven)
    return {"dp": dp, "sp": sp, "norm": norm, "loss_name": loss_name, "checkpoint": plan.checkpoint,
            "loss": float(replica_loss.detach()) / world, "ref_loss": float(ref_loss.detach()),
            "max_rel_grad_error": grad_error,
            "logits_error": max_rel_error(logits.detach(),
                                          slab(ref_logits.detach()[replica], dims.sp_group, 4), 0.0),
            "inference_error": max_rel_error(whole, ref_whole, 0.0)}


def staged_case(dp: int, sp: int, pp: int) -> dict:
    """Stages of slabs: each of ``pp`` stages split over ``sp`` ranks (and ``dp`` replicas, each with its
    share of the batch), trained through the pipeline's schedule (two micro-batches), equal to the unsplit
    model's loss and gradients (float64 weights: the stages exchange float64 without autocast)."""
    cfg = probe_config(2, "instance", {"dp": dp, "sp": sp, "pp": pp, "microbatches": 2, "checkpoint": "none"})
    cfg.data.batch_size, cfg.trainer.precision = 2, "fp32"
    model, reference, loss_fn, targets, image, target = probe_problem(cfg, None, 2 * dp)
    ref_loss = loss_fn(reference(image), target)
    ref_loss.backward()

    dims = ParallelDims(dp=dp, pp=pp, world=dist.get_world_size(), engine="pipelining", sp=sp)
    plan = plan_split(cfg, 2, targets.out_channels, [2, 32, 24, 16], "cpu", targets)
    net = parallelize(model, dims, plan, torch.device("cpu"), cfg.trainer.precision, cfg.model)
    mine = slice(2 * dims.dp_rank, 2 * dims.dp_rank + 2)  # this replica's two samples
    loss = net.train_step(slab(image[mine], dims.sp_group, 4), slab(target[mine], dims.sp_group, 4),
                          parallel_loss(loss_fn, dims))
    loss = dims.dp_mean(loss)  # the replicas' mean: the whole batch's loss
    grads = {name: p.grad for name, p in model.named_parameters() if net.owns(name)}
    wanted = {name: p.grad for name, p in reference.named_parameters() if name in grads}
    scale = max(float(p.grad.abs().max()) for p in reference.parameters()) * 1e-6
    error = torch.tensor([max(max_rel_error(grads[n], g, scale) for n, g in wanted.items())])
    dist.all_reduce(error, op=dist.ReduceOp.MAX)  # over every stage's parameters
    squares = torch.tensor([sum(float((grads[n] - g).pow(2).sum()) for n, g in wanted.items()),
                            sum(float(g.pow(2).sum()) for g in wanted.values())], dtype=torch.float64)
    dist.all_reduce(squares)  # every stage counted sp times, numerator and denominator alike
    infer = inference_module(model, net, dims, 4).eval()
    uneven = image[:2, :, :28]
    with torch.no_grad():
        whole = infer(uneven)
        ref_whole = reference.eval()(uneven)
    return {"dp": dp, "sp": sp, "pp": pp, "stages": [list(s.blocks) for s in plan.stages], "plan_sp": plan.sp,
            "loss": loss, "ref_loss": float(ref_loss.detach()), "max_rel_grad_error": float(error),
            "normwise_grad_error": float((squares[0] / squares[1]).sqrt()),
            "inference_error": max_rel_error(whole, ref_whole, 0.0)}


def bf16_case(sp: int) -> dict:
    """Under bf16 autocast (the CPU default) the split runs its convolutions in bf16 as the unsplit layers
    do: the loss agrees to bf16 rounding and the gradients point the same way."""
    cfg = probe_config(2, "instance", {"dp": 1, "sp": sp})
    targets = Targets.from_config(LABELS, None)
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, targets.out_channels).to(memory_format=torch.channels_last_3d)
    reference = copy.deepcopy(model)
    loss_fn = build_loss(cfg.optim, targets)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 2, 32, 24, 16, generator=generator)
    target = targets.loss_target(torch.randint(0, 3, (1, 1, 32, 24, 16), generator=generator))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits = reference(image)
    ref_loss = loss_fn(ref_logits.float(), target)
    ref_loss.backward()
    dims = ParallelDims(dp=1, pp=1, world=dist.get_world_size(), sp=sp)
    plan = plan_split(cfg, 2, targets.out_channels, [2, 32, 24, 16], "cpu")
    net = parallelize(model, dims, plan, torch.device("cpu"), cfg.trainer.precision, cfg.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(slab(image, dims.sp_group, 4))
    loss = parallel_loss(loss_fn, dims)(logits.float(), slab(target, dims.sp_group, 4))
    loss.backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    want = torch.cat([p.grad.flatten() for p in reference.parameters()])
    return {"sp": sp, "dtype": str(logits.dtype), "loss": float(loss.detach()),
            "ref_loss": float(ref_loss.detach()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(got, want, dim=0))}


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    layouts = [(1, world)] + ([(2, world // 2)] if world == 4 else []) if world <= 4 else []
    for dp, sp in layouts:
        for variant in VARIANTS:
            row = case(dp, sp, *variant)
            if dist.get_rank() == 0:
                print(json.dumps(row), flush=True)
    if world <= 4:
        row = bf16_case(world)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
    if world in (4, 8):  # sp=2 x pp=2, and with two replicas
        row = staged_case(world // 4, 2, 2)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
