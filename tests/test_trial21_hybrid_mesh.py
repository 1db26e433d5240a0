"""Hybrid attention's mesh on torch 2.11 (the GPU machines' torch): ``DeviceMesh._unflatten`` there refuses every
dimension given by name (an inverted check: "dim sp specified in `_unflatten` is not in ('pp', 'dp', 'sp', 'tp')"), so
``attention="hybrid"`` failed at setup at any layout (found by a new user's trial with torch 2.11). The topology now
names the ``sp`` dimension by index. The worker replays torch 2.11's check on this machine's torch and builds the
hybrid groups of sp 2 (Ulysses degree 2, ring degree 1) on 2 gloo ranks.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed


def hybrid_worker() -> dict:
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from lightning_seqpar.topology import ParallelDims, Topology
    from tests.dist_utils import init_gloo

    original = DeviceMesh._unflatten

    def unflatten_as_torch_2_11(self, dim, *args, **kwargs):
        if isinstance(dim, str) and dim in (self.mesh_dim_names or ()):
            raise ValueError(f"dim {dim} specified in `_unflatten` is not in {self.mesh_dim_names}")
        return original(self, dim, *args, **kwargs)

    DeviceMesh._unflatten = unflatten_as_torch_2_11
    init_gloo()
    topology = Topology(ParallelDims(world_size=dist.get_world_size(), sequence_parallel_size=2),
                        timeout=datetime.timedelta(seconds=60))
    ulysses, ring = topology.hybrid_groups(2)
    return {"ulysses": dist.get_world_size(ulysses), "ring": dist.get_world_size(ring),
            "names": topology.hybrid_mesh(2).mesh_dim_names}


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_hybrid_mesh_builds_where_unflatten_refuses_dimension_names():
    for result in run_distributed("tests.test_trial21_hybrid_mesh:hybrid_worker", 2, timeout=240):
        assert result["ulysses"] == 2 and result["ring"] == 1, result
        assert result["names"] == ("pp", "dp", "ring", "ulysses", "tp"), result
