"""Planner: profiling sources agree on sizes, splits balance time within the memory budget, skips count
on every stage they cross, failures say what would fit; the ``plan`` CLI writes plan.json."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import lampseg
from monai.networks.nets import UNet

from lampseg.planner.plan import PlanError, make_plan
from lampseg.planner.profile import BlockCost, profile_blocks

MB = 2**20


def _cost(name, time_s=1.0, act_mb=0.0, in_mb=0.0, out_mb=0.0, params=0):
    return BlockCost(name, params, params * 4, time_s, 0.0, int(act_mb * MB), int(in_mb * MB),
                     int(out_mb * MB))


def test_estimate_and_measure_agree_on_sizes():
    def model():
        torch.manual_seed(0)
        return UNet(3, 2, 3, (4, 8, 16), (2, 2), num_res_units=1)

    measured = profile_blocks(model(), [2, 16, 16, 16], "measure", repeats=1)
    with torch.device("meta"):
        meta_model = model()
    estimated = profile_blocks(meta_model, [2, 16, 16, 16], "estimate")
    assert [c.name for c in measured] == ["down0", "down1", "bottom", "up1", "up0"]
    for m, e in zip(measured, estimated):
        sizes = (m.params, m.act_bytes, m.in_bytes, m.out_bytes)
        assert sizes == (e.params, e.act_bytes, e.in_bytes, e.out_bytes)
        assert m.time_s > 0 and e.flops > 0
    # Skips: down1's output state carries down0's output too, and that is what the bottom block receives.
    assert estimated[2].in_bytes == estimated[1].out_bytes > estimated[0].out_bytes
    assert sum(c.params for c in estimated) == sum(p.numel() for p in model().parameters())


def test_split_balances_time():
    costs = [_cost(f"b{i}", t) for i, t in enumerate([4, 1, 1, 1, 1, 4, 4])]
    plan = make_plan(costs, 3, 1, None, [1, 8, 8, 8], microbatches=1, checkpoint="none")
    assert [s.blocks for s in plan.stages] == [["b0", "b1", "b2"], ["b3", "b4", "b5"], ["b6"]]
    assert max(s.time_s for s in plan.stages) == 6
    assert plan.bubble == pytest.approx(2 / 3)


def test_budget_moves_boundaries_and_chooses_checkpointing():
    costs = [_cost("big", 1, act_mb=900, in_mb=10, out_mb=10), _cost("b1", 1, act_mb=10, in_mb=10, out_mb=10),
             _cost("b2", 1, act_mb=10, in_mb=10, out_mb=10)]
    free = make_plan(costs, 2, 2, None, [1, 8, 8, 8], checkpoint="none", microbatches=1)
    assert free.stages[0].blocks == ["big"]
    with pytest.raises(PlanError):
        make_plan(costs, 2, 2, 1.0, [1, 8, 8, 8], checkpoint="none")  # 2 x 900 MB stashed > 1 GB
    plan = make_plan(costs, 2, 2, 1.0, [1, 8, 8, 8])  # auto: checkpointing makes it fit
    assert plan.checkpoint in ("block", "all") and plan.microbatches == 2
    assert all(s.memory_gb <= 1.0 for s in plan.stages)


def test_skip_tensors_count_on_every_stage_they_cross():
    # A large skip enters at b0's output and is carried through b1 and b2 (their input states hold it).
    light = [_cost("b0", in_mb=1, out_mb=501), _cost("b1", in_mb=501, out_mb=501),
             _cost("b2", in_mb=501, out_mb=1)]
    plan = make_plan(light, 3, 1, None, [1, 8, 8, 8], microbatches=1, checkpoint="none")
    assert plan.stages[1].activation_gb * 1024 >= 2 * 500  # received and sent on by the middle stage


def test_skip_crossing_a_stage_is_one_tensor_not_two():
    """The middle stage's received skip leaves it unchanged: its output holds the same tensor, so it is
    counted once there (plus the gradient buffer for it coming back from the next stage)."""
    def block(name, through):
        return BlockCost(name, 0, 0, 1.0, 0.0, 0, 501 * MB, 501 * MB, in_sizes=[500 * MB, MB],
                         through=through)

    crossing = [block("b0", [0, -1]), block("b1", [0, -1]), block("b2", [0, -1])]
    copying = [block("b0", [-1, -1]), block("b1", [-1, -1]), block("b2", [-1, -1])]
    middle = [make_plan(c, 3, 1, None, [1, 8, 8, 8], microbatches=1, checkpoint="none").stages[1]
              for c in (crossing, copying)]
    assert (middle[1].activation_gb - middle[0].activation_gb) * 1024 == pytest.approx(500)


def test_impossible_budgets_say_what_would_fit():
    with torch.device("meta"):
        model = UNet(3, 4, 3, (32, 64, 128, 256), (2, 2, 2), num_res_units=1)
    costs = profile_blocks(model, [4, 128, 128, 128], "estimate")
    with pytest.raises(PlanError, match=r"parallel.pp.*at most 7") as err:
        make_plan(costs, 8, 2, None, [4, 128, 128, 128])
    four = make_plan(costs, 4, 2, None, [4, 128, 128, 128], checkpoint="all")
    budget = 1.01 * max(s.memory_gb for s in four.stages)
    with pytest.raises(PlanError) as err:
        make_plan(costs, 1, 2, budget, [4, 128, 128, 128], divisor=8)
    message = str(err.value)
    assert f"parallel.memory_gb={budget:g}" in message and "data.patch_size=[" in message
    stages = int(message.split("parallel.pp=")[1].split(";")[0])
    assert 2 <= stages <= 4
    make_plan(costs, stages, 2, budget, [4, 128, 128, 128])  # the suggested stage count fits
    side = int(message.split("data.patch_size=[")[1].split(",")[0])
    assert side % 8 == 0 and side < 128
    with torch.device("meta"):
        model = UNet(3, 4, 3, (32, 64, 128, 256), (2, 2, 2), num_res_units=1)
    smaller = profile_blocks(model, [4, side, side, side], "estimate")
    make_plan(smaller, 1, 2, budget, [4, side, side, side])  # and so does the suggested input


def test_plan_cli_writes_plan_json(tmp_path):
    out = lampseg("plan", "+exp=smoke", "parallel.pp=2", "parallel.memory_gb=1", f"run_dir={tmp_path}").stdout
    assert "bubble=" in out and "stage" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["plan"]["pp"] == 2 and len(plan["plan"]["stages"]) == 2
    assert plan["largest_cube"] % 4 == 0 and plan["largest_cube"] >= 32 and "largest cubic input" in out
    assert [b["name"] for b in plan["blocks"]] == ["down0", "down1", "bottom", "up1", "up0"]
    assert plan["plan"]["bubble"] == pytest.approx(1 / (plan["plan"]["microbatches"] + 1))
    bad = lampseg("plan", "+exp=smoke", "parallel.pp=9", f"run_dir={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and "parallel.pp" in bad.stderr


@pytest.mark.extended  # in-process: ParallelDims.from_config's tests
def test_train_refuses_stages_outside_parallel_pipeline(tmp_path):
    bad = lampseg("train", "+exp=smoke", "parallel.pp=2", f"run_dir={tmp_path / 'y'}", check=False)
    assert bad.returncode == 2 and "parallel.pp" in bad.stderr


@pytest.mark.extended  # default suite: test_inference_memory.py's in-process data.patch_size=auto test
def test_plan_auto_patch_is_chosen_for_the_stages_it_prints(tmp_path):
    """One source of truth for the layout: ``plan parallel.pp=2`` without ``parallel=pipeline`` chooses the
    automatic patch for the two stages its table shows, as ``parallel=pipeline parallel.pp=2`` does (it
    used to choose for one stage), and a smaller budget per stage never gets a larger patch."""
    chosen = {}
    for name, layout in [("what-if", []), ("pipeline", ["parallel=pipeline", "parallel.engine=gpipe"])]:
        run_dir = tmp_path / name
        lampseg("plan", "+exp=smoke", "data.patch_size=auto", *layout, "parallel.pp=2",
                "parallel.memory_gb=0.02", f"run_dir={run_dir}")
        plan = json.loads((run_dir / "plan.json").read_text())
        assert plan["plan"]["pp"] == 2 and plan["patch_size_auto"]["pp"] == 2
        chosen[name] = plan["patch_size_auto"]["patch_size"]
    assert chosen["what-if"] == chosen["pipeline"]


def test_largest_cube_grows_with_stages_and_really_fits():
    """LAMP's point: more stages, larger inputs; the size found fits when profiled at that size."""
    from lampseg.planner.plan import largest_cube

    def unet():
        with torch.device("meta"):
            return UNet(3, 4, 3, (16, 32, 64, 128), (2, 2, 2), num_res_units=1)

    shape = [4, 64, 64, 64]
    costs = profile_blocks(unet(), shape, "estimate")
    budget = 0.25
    sides = [largest_cube(costs, pp, 2, budget, shape, divisor=8) for pp in (1, 2, 4)]
    assert 0 < sides[0] <= sides[1] <= sides[2] and sides[0] < sides[2]
    for pp, side in zip((1, 2, 4), sides):
        fitting = [4, side, side, side]
        make_plan(profile_blocks(unet(), fitting, "estimate"), pp, 2, budget, fitting)
        bigger = side + 8
        with pytest.raises(PlanError):
            make_plan(profile_blocks(unet(), [4, bigger, bigger, bigger], "estimate"), pp, 2, budget,
                      [4, bigger, bigger, bigger])


def test_1f1b_plans_at_least_as_many_microbatches_as_stages():
    costs = [_cost(f"b{i}", 1, act_mb=10, in_mb=1, out_mb=1) for i in range(4)]
    plan = make_plan(costs, 2, 4, None, [1, 8, 8, 8], schedule="1f1b")
    assert plan.microbatches >= 2
    with pytest.raises(PlanError, match="parallel.microbatches"):
        make_plan(costs, 4, 2, None, [1, 8, 8, 8], schedule="1f1b")
    with pytest.raises(PlanError, match="parallel.microbatches"):
        make_plan(costs, 2, 4, None, [1, 8, 8, 8], microbatches=1, schedule="1f1b")
    # 1F1B keeps fewer micro-batches in flight on later stages: the last stage needs less than GPipe's.
    gpipe = make_plan(costs, 2, 4, None, [1, 8, 8, 8], microbatches=4, schedule="gpipe", checkpoint="none")
    one = make_plan(costs, 2, 4, None, [1, 8, 8, 8], microbatches=4, schedule="1f1b", checkpoint="none")
    assert one.stages[-1].activation_gb < gpipe.stages[-1].activation_gb
