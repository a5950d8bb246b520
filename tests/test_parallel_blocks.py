"""The U-Net as blocks: exactly the MONAI UNet, whole or cut into stages, and under torchgpipe."""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet
from torchgpipe import GPipe

from lampseg.parallel.blocks import sequential_unet, unet_blocks

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
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_torchgpipe_gives_the_unsplit_loss_and_gradients(balance, chunks):
    """Skip tensors crossing stages keep their gradients (pp 2 and 4, several micro-batch counts)."""
    torch.manual_seed(0)
    model = UNet(3, 2, 3, (4, 8, 16), (2, 2), num_res_units=1).double()
    x = torch.randn(4, 2, 16, 16, 16, dtype=torch.double)
    ref = model(x).pow(2).mean()
    ref.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pipe = GPipe(sequential_unet(model), balance=balance, devices=["cpu"] * len(balance), chunks=chunks,
                 checkpoint="never")
    loss = pipe(x).pow(2).mean()
    loss.backward()
    assert torch.allclose(loss, ref, rtol=1e-12)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-9, atol=1e-12)
