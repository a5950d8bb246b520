"""torchrun worker (2 processes): slab inference decides as a group. ``inference.mode=auto`` with a budget the
whole volume fits: every rank infers its slab; then one rank runs out of memory at the start of its slab's
forward (injected), and every rank falls back to the same sliding windows, whose logits equal one process's.
Prints one JSON line on rank 0.

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT tests/workers/slab_fallback.py
"""
import json
import warnings

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lampseg.config import Config
from lampseg.engine.inference import infer
from lampseg.engine.slab_inference import SlabLogits, infer_volume
from lampseg.model.unet import build_model
from lampseg.parallel.dims import ParallelDims
from lampseg.parallel.parallelize import inference_module, parallelize
from lampseg.planner.inference import InferenceMemory


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = OmegaConf.structured(Config)
    cfg.model.merge_with({"name": "probe", "channels": [8, 16, 32], "strides": [2, 2], "kernel_size": 3,
                          "num_res_units": 1, "norm": "instance", "dropout": 0.0})
    cfg.inference.merge_with({"mode": "auto", "overlap": 0.25, "sw_batch_size": 1, "tta": False})
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, 3).eval()
    reference = build_model(cfg.model, 2, 3).eval()
    reference.load_state_dict(model.state_dict())
    image = torch.randn(1, 2, 32, 24, 20, generator=torch.Generator().manual_seed(1))
    dims = ParallelDims(dp=1, pp=1, world=2, sp=2)
    net = parallelize(model, dims, None, torch.device("cpu"), "fp32", cfg.model, train=False)
    split = inference_module(model, net, dims, 4).eval()
    memory = InferenceMemory.from_config(cfg.model, 2, 3, slabs=2, budget_gb=1.0)
    host = image[0].numpy()
    shape = list(image.shape[2:])

    def run(report: dict):
        return infer_volume(split, lambda lo, hi: host[:, lo:hi], shape, cfg.inference, [16, 16, 16], 4,
                            "fp32", torch.device("cpu"), memory, report, lambda: image)

    first: dict = {}
    slab = run(first)
    fallbacks = []
    # out of memory at the start of the first block (before any exchange), of the middle (rank 0, after the
    # first block's halo exchanges and all-reduces) and of the last block: each time all ranks fall back
    for block, failing_rank in ((0, 1), (1, 0), (2, 1)):
        armed = {"on": rank == failing_rank}

        def out_of_memory(module, args, armed=armed):
            if armed["on"]:
                armed["on"] = False
                raise torch.OutOfMemoryError(f"injected: out of memory on rank {rank}")

        hook = model.model[block].register_forward_pre_hook(out_of_memory)
        second: dict = {}
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            fallback = run(second)
        hook.remove()
        fallbacks.append((block, failing_rank, second, fallback))
    with torch.no_grad():
        whole = reference(image)
    sizes = [None, None]
    dist.all_gather_object(sizes, [slab.start, slab.stop] if isinstance(slab, SlabLogits) else None)
    rows = []
    for block, failing_rank, second, fallback in fallbacks:
        sliding = OmegaConf.merge(cfg.inference, {"mode": "sliding"})
        alone = infer(reference, image, sliding, second["window"], 4)
        rows.append({"block": block, "failing_rank": failing_rank, "mode": second["mode"],
                     "window": second["window"], "fallbacks": second["fallbacks"],
                     "fallback_error": float((fallback - alone).abs().max())})
    if rank == 0:
        print(json.dumps({
            "first_mode": first["mode"], "first_is_slab": isinstance(slab, SlabLogits), "rows": sizes,
            "slab_error": float((slab.logits - whole[:, :, slab.start:slab.stop]).abs().max()),
            "fallbacks": rows}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
