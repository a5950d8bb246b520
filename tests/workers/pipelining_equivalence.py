"""torchrun worker: the U-Net blocks as ``torch.distributed.pipelining`` stages (one per rank) give the
unsplit model's loss and gradients. Prints one JSON line per (schedule, micro-batches) on the last rank.

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \
        tests/workers/pipelining_equivalence.py
"""
import json

import torch
import torch.distributed as dist
from monai.networks.nets import UNet
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from lampseg.model.blocks import unet_blocks

BOUNDS = {2: [(0, 2), (2, 5)], 4: [(0, 1), (1, 2), (2, 4), (4, 5)]}
BATCH = 4


class StageModule(nn.Module):
    """Blocks of one stage; takes the received tensors as separate arguments, returns contiguous ones
    (gloo sends and receives contiguous buffers only)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, *tensors):
        out = self.blocks(tensors[0] if len(tensors) == 1 else tensors)
        return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = UNet(3, 2, 3, (4, 8, 16), (2, 2), num_res_units=1).double()
    x = torch.randn(BATCH, 2, 16, 16, 16, dtype=torch.double)
    y = torch.randn(BATCH, 3, 16, 16, 16, dtype=torch.double)

    def loss_fn(out, target):
        return ((out - target) ** 2).mean()

    ref = loss_fn(model(x), y)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    blocks, specs = unet_blocks(model)
    lo, hi = BOUNDS[world][rank]
    stage_module = StageModule(blocks[lo:hi])
    for schedule in (ScheduleGPipe, Schedule1F1B):
        for micro in (1, 2, 4):
            if schedule is Schedule1F1B and micro < world:
                continue  # 1F1B needs at least as many micro-batches as stages
            # Explicit example arguments: shape inference at run time gave gloo non-contiguous buffers.
            state = x[: BATCH // micro]
            for block in blocks[:lo]:
                state = block(state)
            inputs = state if isinstance(state, tuple) else (state,)
            inputs = tuple(t.detach().contiguous().requires_grad_(rank > 0) for t in inputs)
            outputs = stage_module(*inputs)
            model.zero_grad()
            stage = PipelineStage(stage_module, rank, world, torch.device("cpu"), input_args=inputs,
                                  output_args=outputs)
            losses: list = []
            runner = schedule(stage, micro, loss_fn=loss_fn)
            if rank == 0:
                runner.step(x)
            elif rank == world - 1:
                runner.step(target=y, losses=losses)
            else:
                runner.step()
            error = max(((p.grad - ref_grads[f"{s.prefix}.{n}"]).abs().max()
                         / ref_grads[f"{s.prefix}.{n}"].abs().max()).item()
                        for b, s in zip(blocks[lo:hi], specs[lo:hi]) for n, p in b.module.named_parameters())
            errors = [None] * world
            dist.all_gather_object(errors, error)
            if rank == world - 1:
                loss = float(sum(losses) / len(losses))
                print(json.dumps({"schedule": schedule.__name__, "microbatches": micro, "loss": loss,
                                  "ref_loss": float(ref), "max_rel_grad_error": max(errors)}), flush=True)
            model.zero_grad()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
