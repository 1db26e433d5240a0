"""ParallelDims validation and rank layout (no process group), and Topology's DeviceMesh and groups across 4 and 8 gloo
processes (one launch per world size: the workers of a world run one after the other in it)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_seqpar.topology import (
    ParallelDims,
    Topology,
    TopologyError,
    hybrid_rank_grid,
)
from tests.dist_utils import init_gloo, run_distributed_each


def test_infers_data_parallel_size():
    dims = ParallelDims(world_size=16, sequence_parallel_size=4, pipeline_parallel_size=2)
    assert (dims.dp, dims.pp, dims.sp) == (2, 2, 4)


def test_world_not_divisible_names_every_factor():
    with pytest.raises(
        TopologyError, match=r"world_size=6 is not divisible by .* = 4 \* 1 = 4 .*sequence_parallel_size=4"
    ):
        ParallelDims(world_size=6, sequence_parallel_size=4)


def test_explicit_sizes_must_multiply_to_world():
    with pytest.raises(TopologyError, match=r"2 \* 1 \* 2 = 4 != world_size=8"):
        ParallelDims(world_size=8, sequence_parallel_size=2, data_parallel_size=2)


@pytest.mark.parametrize("field", ["world_size", "sequence_parallel_size", "pipeline_parallel_size"])
def test_sizes_must_be_positive(field):
    kwargs = {"world_size": 4, field: 0}
    with pytest.raises(TopologyError, match=f"{field} must be a positive integer"):
        ParallelDims(**kwargs)


def test_data_parallel_size_must_be_positive_or_minus_one():
    with pytest.raises(TopologyError, match="data_parallel_size must be a positive integer or -1"):
        ParallelDims(world_size=4, data_parallel_size=0)


def test_rank_outside_world():
    with pytest.raises(TopologyError, match="rank 8 is outside the world of 8"):
        ParallelDims(world_size=8, sequence_parallel_size=2).coordinates(8)


def test_sequence_shorter_than_sp():
    with pytest.raises(TopologyError, match="3 tokens cannot be split over sequence_parallel_size=4"):
        ParallelDims(world_size=4, sequence_parallel_size=4).check_sequence_length(3)


def test_layout_sp_innermost_then_dp_then_pp():
    dims = ParallelDims(world_size=8, sequence_parallel_size=2, pipeline_parallel_size=2)  # dp = 2
    assert dims.sequence_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.data_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.sequence_data_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dims.pipeline_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for rank in range(8):
        assert dims.rank_of(*dims.coordinates(rank)) == rank


def test_tensor_parallel_size_is_innermost_and_validated():
    dims = ParallelDims(world_size=8, sequence_parallel_size=2, tensor_parallel_size=2)  # dp = 2
    assert dims.mesh_shape == (1, 2, 2, 2)
    assert dims.tensor_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.sequence_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.data_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [dims.rank_of(*dims.coordinates(r), tp_rank=r % 2) for r in range(8)] == list(range(8))
    with pytest.raises(TopologyError, match=r"tensor_parallel_size must be a positive integer"):
        ParallelDims(world_size=4, tensor_parallel_size=0)
    with pytest.raises(TopologyError, match=r"2 \* 1 \* 2 \* 2 = 8 != world_size=4 .*tensor_parallel_size=2"):
        ParallelDims(world_size=4, sequence_parallel_size=2, data_parallel_size=2, tensor_parallel_size=2)


def test_topology_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        Topology(ParallelDims(world_size=1))


def topology_worker() -> dict:
    init_gloo()
    first = Topology(ParallelDims(world_size=4, sequence_parallel_size=2))
    second = Topology(ParallelDims(world_size=4, sequence_parallel_size=4))  # a second one in the same process
    rank = dist.get_rank()

    def members(group):
        t = torch.zeros(4)
        t[rank] = 1
        dist.all_reduce(t, group=group)
        return [i for i in range(4) if t[i] > 0]

    mpu = first.mpu
    return {
        "coords": (first.pp_rank, first.dp_rank, first.sp_rank),
        "sequence": members(first.sequence_group),
        "data": members(first.data_group),
        "sequence_data": members(first.sequence_data_group),
        "second_sequence": members(second.sequence_group),
        "mpu": (
            mpu.get_data_parallel_world_size(),
            mpu.get_data_parallel_rank(),
            dist.get_world_size(mpu.get_data_parallel_group()),
            mpu.get_data_parallel_group_ranks(),
            mpu.get_model_parallel_world_size(),
            dist.get_world_size(mpu.get_model_parallel_group()),
            hasattr(mpu, "get_sequence_parallel_group"),
        ),
        "describe": first.describe(),
    }


# (world, sp, pp, ulysses_degree) of the mesh tests.
MESH_CASES = [(8, 2, 2, 1), (4, 4, 1, 2), (8, 4, 2, 2)]


@pytest.fixture(scope="module")
def launches():
    """``launches(world)``: the results of one launch of ``world`` processes running, in turn, topology_worker (world
    4) and mesh_worker for each of MESH_CASES of that world; keyed "topology" and by the case. Made once per world."""
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            keys, calls = [], []
            if world == 4:
                keys.append("topology")
                calls.append(("tests.test_topology:topology_worker", {}))
            for case in MESH_CASES:
                if case[0] == world:
                    keys.append(case)
                    calls.append(("tests.test_topology:mesh_worker",
                                  {"sp": case[1], "pp": case[2], "ulysses_degree": case[3]}))
            cache[world] = dict(zip(keys, run_distributed_each(calls, world, timeout=300 * len(calls))))
        return cache[world]

    return get


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_groups_across_four_processes(launches):
    results = launches(4)["topology"]
    for rank, r in enumerate(results):
        assert r["coords"] == (0, rank // 2, rank % 2)
        assert r["sequence"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert r["data"] == [rank % 2, rank % 2 + 2]
        assert r["sequence_data"] == [0, 1, 2, 3]
        assert r["second_sequence"] == [0, 1, 2, 3]
        # DeepSpeed's data parallelism is the sequence-data group; no sequence methods (docs/sharding.md).
        assert r["mpu"] == (4, rank, 4, [0, 1, 2, 3], 1, 1, False)
        assert f"rank {rank} -> (pp 0, dp {rank // 2}, sp {rank % 2})" in r["describe"]


def _members(group, world: int) -> list[int]:
    """The global ranks of ``group``, found by a collective (not read from the group object)."""
    t = torch.zeros(world)
    t[dist.get_rank()] = 1
    dist.all_reduce(t, group=group)
    return [i for i in range(world) if t[i] > 0]


def _mine(groups: list[list[int]], rank: int) -> list[int]:
    return next(g for g in groups if rank in g)


def mesh_worker(sp: int, pp: int, ulysses_degree: int) -> dict:
    import datetime

    init_gloo()
    world = dist.get_world_size()
    topology = Topology(ParallelDims(world_size=world, sequence_parallel_size=sp, pipeline_parallel_size=pp),
                        timeout=datetime.timedelta(seconds=47))
    mesh = topology.mesh
    ulysses, ring = topology.hybrid_groups(ulysses_degree)
    hybrid = topology.hybrid_mesh(ulysses_degree)
    return {
        "device_type": mesh.device_type,
        "names": mesh.mesh_dim_names,
        "shape": tuple(mesh.shape),
        "hybrid_names": hybrid.mesh_dim_names,
        "coords": (topology.pp_rank, topology.dp_rank, topology.sp_rank, topology.tp_rank),
        "groups": {
            "sp": _members(topology.sequence_group, world),
            "dp": _members(topology.data_group, world),
            "dp_sp": _members(topology.sequence_data_group, world),
            "pp": _members(topology.pipeline_group, world),
            "tp": _members(topology.tensor_group, world),
            "ulysses": _members(ulysses, world),
            "ring": _members(ring, world),
        },
        "same_objects": (
            mesh.get_group("sp") is topology.sequence_group,
            topology.dp_sp_mesh.get_group() is topology.sequence_data_group,
        ),
        "cached": topology.hybrid_groups(ulysses_degree) == (ulysses, ring),
        "timeout": topology.sequence_data_group._get_backend(torch.device("cpu")).options._timeout.total_seconds(),
        "ring_timeout": ring._get_backend(torch.device("cpu")).options._timeout.total_seconds(),
    }


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world, sp, pp, ulysses_degree", MESH_CASES)
def test_mesh_groups_follow_the_layout_formula(launches, world, sp, pp, ulysses_degree):
    """Every group of the mesh (sp, dp, dp_sp, pp, tp, and ring x ulysses for hybrid) holds the ranks the documented
    formula gives, checked by a collective over each group."""
    results = launches(world)[(world, sp, pp, ulysses_degree)]
    dims = ParallelDims(world_size=world, sequence_parallel_size=sp, pipeline_parallel_size=pp)
    for rank, r in enumerate(results):
        assert r["device_type"] == "cpu"
        assert r["names"] == ("pp", "dp", "sp", "tp") and r["shape"] == (pp, dims.dp, sp, 1)
        assert r["hybrid_names"] == ("pp", "dp", "ring", "ulysses", "tp")
        assert r["coords"] == (*dims.coordinates(rank), 0)
        sequence = _mine(dims.sequence_groups(), rank)
        assert sequence == [dims.rank_of(*dims.coordinates(rank)[:2], s) for s in range(sp)]
        ulysses_groups, ring_groups = hybrid_rank_grid(sequence, ulysses_degree)
        assert r["groups"] == {
            "sp": sequence,
            "dp": _mine(dims.data_groups(), rank),
            "dp_sp": _mine(dims.sequence_data_groups(), rank),
            "pp": _mine(dims.pipeline_groups(), rank),
            "tp": [rank],
            "ulysses": _mine(ulysses_groups, rank),
            "ring": _mine(ring_groups, rank),
        }
        assert r["same_objects"] == (True, True) and r["cached"]
        assert r["timeout"] == 47 and r["ring_timeout"] == 47  # the strategy's timeout reaches every group


def test_hybrid_degree_must_divide_sp():
    class Fake:
        sp = 4

    with pytest.raises(TopologyError, match=r"ulysses_degree=3 does not divide sequence_parallel_size=4"):
        Topology.hybrid_mesh(Fake(), 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "devices", "message"),
    [
        ({"sequence_parallel_size": 4}, 2, r"world_size=2 is not divisible by .* = 4 \* 1 = 4"),
        ({"tensor_parallel_size": 4}, 6, r"world_size=6 is not divisible by .* = 1 \* 1 \* 4 = 4"),
        ({"sequence_parallel_size": 2, "tensor_parallel_size": 2}, 2, r"= 2 \* 1 \* 2 = 4 .*devices per node x nodes"),
    ],
)
def test_a_layout_that_does_not_factor_fails_in_the_trainer_constructor(kwargs, devices, message, monkeypatch):
    """Raised by Trainer(...) itself, before any process is launched (one error, not one per rank)."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies.launchers import subprocess_script

    from lightning_seqpar import SeqParStrategy

    def no_launch(*args, **kwargs):
        raise AssertionError("a process was launched")

    monkeypatch.setattr(subprocess_script._SubprocessScriptLauncher, "launch", no_launch)
    with pytest.raises(TopologyError, match=message):
        pl.Trainer(accelerator="cpu", devices=devices, strategy=SeqParStrategy(process_group_backend="gloo", **kwargs),
                   logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=SeqParStrategy(process_group_backend="gloo"),
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.strategy.sequence_parallel_size == 2  # a layout that factors builds as before
