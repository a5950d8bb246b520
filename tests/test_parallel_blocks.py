"""The U-Net as blocks: exactly the MONAI UNet, whole or cut into stages, and under torchgpipe."""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from lampseg.model.blocks import sequential_unet, unet_blocks
from lampseg.parallel.gpipe import gpipe

CONFIGS = [((8, 16, 32), (2, 2), 1), ((4, 8, 16, 32), (2, 2, 2), 2), ((4, 8), (2,), 0)]


@pytest.mark.parametrize("channels,strides,res", CONFIGS)
def test_blocks_equal_unet_whole_and_cut(channels, strides, res):
    torch.manual_seed(0)
    model = UNet(3, 2, 3, channels, strides, num_res_units=res).eval()
    x = torch.randn(2, 2, 16, 16, 16)
    seq = sequential_unet(model)
    blocks, specs = unet_blocks(model)
    assert len(blocks) == 2 * len(strides) + 1
    assert [s.kind for s in specs] == ["down"] * len(strides) + ["bottom"] + ["up"] * len(strides)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(seq(x), ref)
        for cut in range(1, len(seq)):
            assert torch.equal(seq[cut:](seq[:cut](x)), ref), cut


def test_block_prefixes_name_the_unsplit_parameters():
    model = UNet(3, 2, 3, (4, 8, 16), (2, 2), num_res_units=1)
    names, covered = set(model.state_dict()), set()
    for block, spec in zip(*unet_blocks(model)):
        local = {f"{spec.prefix}.{k}" for k in block.module.state_dict()}
        assert local and local <= names, spec
        covered |= local
    assert covered == names


@pytest.mark.parametrize("balance", [[2, 3], [1, 1, 1, 2]])
@pytest.mark.parametrize("chunks,checkpoint", [(1, "none"), (2, "none"), (4, "none"), (2, "all")])
def test_torchgpipe_gives_the_unsplit_loss_and_gradients(balance, chunks, checkpoint):
    """The gpipe engine (skips stashed and popped, pp 2 and 4, several micro-batch counts, recomputation)
    gives the unsplit loss and gradients, and the stages in between receive only the activation: the
    skips go straight from the stage that makes them to the stage that uses them."""
    torch.manual_seed(0)
    model = UNet(3, 2, 3, (4, 8, 16), (2, 2), num_res_units=1).double()
    x = torch.randn(4, 2, 16, 16, 16, dtype=torch.double)
    ref = model(x).pow(2).mean()
    ref.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pipe = gpipe(model, balance, torch.device("cpu"), chunks, checkpoint)
    received = {k: [] for k in range(len(balance))}
    for k, partition in enumerate(pipe.partitions):
        partition.register_forward_pre_hook(lambda _, args, k=k: received[k].append(args[0]))
    loss = pipe(x).pow(2).mean()
    loss.backward()
    assert torch.allclose(loss, ref, rtol=1e-12)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-9, atol=1e-12)
    for k in range(1, len(balance)):  # one tensor of the activation's channels, never a (skips, x) tuple
        assert received[k] and all(isinstance(t, torch.Tensor) for t in received[k]), k
