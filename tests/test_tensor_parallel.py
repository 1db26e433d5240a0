"""Tensor parallelism (lightning_seqpar.tensor_parallel) against single-process training, on the CPU with gloo.

Unit tests: the fused-row permutation, the plan found for each block kind, the errors. Multi-process: tp 2 alone
(the bundled timm-shaped Block with SGD and AdamW, torch nn.TransformerEncoder, the real Hugging Face ViT, the bundled
ClimaX), tp 2 x dp 2 and tp 2 x sp 2 (the project's sequence parallelism on each tensor-parallel rank's heads), 4
samples per step, 13 / 10 / 15 tokens (odd: sp shards are uneven, and so are the tp shards of Megatron-LM sequence
parallelism, on by default; one run with it off). The norms inside the blocks see each tp rank's share of the
tokens (or all of them with it off). Each: parameters after 3 steps within relative
error 1e-5 of single-process training (fp32), losses within 1e-5, the state dict in the single-device layout
(fused qkv rows in their original order) before and after training, and a whole state dict loaded back into a freshly
split model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.dist_utils import run_distributed_each
from tests.tp_workers import train_single_process

TOLERANCE = 1e-5


def max_rel_error(got: dict, want: dict) -> tuple[float, str]:
    """The contract's measure (tests/test_strategy_contract.py): per-tensor ||a - b|| / ||b||, and for tensors that
    stay near zero (||b|| < 1e-3) the absolute difference, which must stay under 1e-7."""
    worst, name = 0.0, ""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        diff, scale = (got[key].double() - value.double()).norm().item(), value.double().norm().item()
        err = diff / scale if scale >= 1e-3 else (0.0 if diff <= 1e-7 else float("inf"))
        if err > worst:
            worst, name = err, key
    return worst, name


def without_key_bias(state: dict) -> dict:
    """The state with the key third of every fused qkv bias zeroed. Softmax ignores a constant added to all scores of
    a query, so the key bias's true gradient is exactly 0 and what either run computes for it is rounding noise,
    which Adam divides by its own square root into steps of size lr: the two runs' key biases then differ by O(lr)
    whatever the parallelism. (SGD's steps stay O(noise); the contract compares those.)"""
    out = dict(state)
    for key, value in state.items():
        if key.endswith(("qkv.bias", "in_proj_bias")):
            width = value.shape[0] // 3
            out[key] = torch.cat([value[:width], torch.zeros_like(value[width:2 * width]), value[2 * width:]])
    return out


def check_against_single_process(
    per_rank: list[dict], name: str, optimizer: str = "sgd", tolerance: float = TOLERANCE
) -> float:
    reference = train_single_process(name, optimizer)
    if optimizer == "adamw":
        reference["final"] = without_key_bias(reference["final"])
        for r in per_rank:
            r["final"] = without_key_bias(r["final"])
            r["reloaded"] = without_key_bias(r["reloaded"]) if r.get("reloaded") is not None else None
    worst = 0.0
    for r in per_rank:
        # The split model's state dict is the single-device one, exactly (fused rows back in their order).
        err, key = max_rel_error(r["after_split"], reference["initial"])
        assert err == 0.0, f"{name} rank {r['rank']}: state dict after the split differs at {key}"
        err, key = max_rel_error(r["final"], reference["final"])
        assert err < tolerance, f"{name} rank {r['rank']}: parameter {key} off by relative error {err:.2e}"
        worst = max(worst, err)
        moved, _ = max_rel_error(r["final"], reference["initial"])
        assert moved > 1e-3, "training did not change the parameters"
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]), rtol=tolerance, atol=0)
        if r.get("reloaded") is not None:
            err, key = max_rel_error(r["reloaded"], r["final"])
            assert err == 0.0, f"{name}: a whole state dict loaded into a split model came back different at {key}"
    print(f"{name} ({optimizer}): largest relative parameter error {worst:.2e}")
    return worst


# ---------------------------------------------------------------------------------------------------------
# Unit tests: no process group.
# ---------------------------------------------------------------------------------------------------------


def test_fused_row_permutation_gives_each_rank_its_heads_of_q_k_and_v():
    from lightning_seqpar.tensor_parallel import fused_row_permutation

    # D = 4 (q rows 0-3, k rows 4-7, v rows 8-11), tp = 2: rank 0 holds q0 q1 k4 k5 v8 v9.
    perm = fused_row_permutation(12, 3, 2)
    assert perm.tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    assert torch.equal(perm[torch.argsort(perm)], torch.arange(12))
    with pytest.raises(ValueError, match="cannot be split over tensor_parallel_size=4"):
        fused_row_permutation(18, 3, 4)


def _dinov2_swiglu_layer():
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer

    return Dinov2Layer(Dinov2Config(hidden_size=32, num_attention_heads=4, use_swiglu_ffn=True))


def _hf_layer():
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTLayer

    return ViTLayer(ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64))


@pytest.mark.parametrize(
    "make,expected",
    [
        (
            lambda: __import__("lightning_seqpar.weather.models.layers", fromlist=["Block"]).Block(32, 4),
            {"attn.qkv": "fused:3", "attn.proj": "rowwise", "mlp.fc1": "colwise", "mlp.fc2": "rowwise"},
        ),
        (
            lambda: nn.TransformerEncoderLayer(32, 4, 64, batch_first=True),
            {"self_attn": "multihead_attention", "linear1": "colwise", "linear2": "rowwise"},
        ),
        (
            _hf_layer,
            {
                "attention.q_proj": "colwise",
                "attention.k_proj": "colwise",
                "attention.v_proj": "colwise",
                "attention.o_proj": "rowwise",
                "mlp.fc1": "colwise",
                "mlp.fc2": "rowwise",
            },
        ),
        (
            _dinov2_swiglu_layer,
            {
                "attention.q_proj": "colwise",
                "attention.k_proj": "colwise",
                "attention.v_proj": "colwise",
                "attention.o_proj": "rowwise",
                "mlp.gate_proj": "colwise",
                "mlp.up_proj": "colwise",
                "mlp.down_proj": "rowwise",
            },
        ),
    ],
    ids=["bundled-block", "torch-encoder-layer", "hugging-face-vit", "hugging-face-dinov2-swiglu"],
)
def test_block_plan_per_kind(make, expected):
    from lightning_seqpar.tensor_parallel import block_plan

    _, plan = block_plan(make())
    assert plan == expected


def test_per_head_norms_are_split_over_the_head_dimension():
    from lightning_seqpar.tensor_parallel import block_plan
    from lightning_seqpar.weather.models.layers import Block

    block = Block(32, 4)
    block.attn.q_norm, block.attn.k_norm = nn.LayerNorm(8), nn.LayerNorm(8)  # timm qk_norm=True
    assert block_plan(block)[1]["attn.q_norm"] == "head_norm:1"


def test_unknown_block_and_whole_width_norm_are_refused():
    from lightning_seqpar.tensor_parallel import (
        TensorParallelError,
        block_plan,
        infer_tensor_parallel_plan,
    )
    from lightning_seqpar.weather.models.layers import Block

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer, self.ffn = nn.Linear(8, 8), nn.Linear(8, 8)

    with pytest.raises(TensorParallelError, match=r"blocks.0 \(Odd\) has no attention .* mixer, ffn\. Pass tp_plan"):
        infer_tensor_parallel_plan(_Holder(Odd))
    block = Block(32, 4)
    block.attn.norm = nn.LayerNorm(32)  # timm scale_norm=True
    with pytest.raises(TensorParallelError, match=r"attn.norm \(LayerNorm\) normalises over the whole width"):
        block_plan(block)


def test_attention_reshaping_to_the_input_width_fails_with_a_clear_error():
    """tests.models.FusedQKVAttention ends with reshape(B, N, C), as older timm does: on a rank holding half of the
    heads (what apply_tensor_parallel leaves: local num_heads, a qkv of 3 D / 2 rows) the error names the module."""
    from lightning_seqpar.tensor_parallel import TensorParallelError, localize_heads
    from lightning_seqpar.tensor_parallel.plan import _explain_width_errors
    from tests.models import FusedQKVAttention

    attention = FusedQKVAttention(32, 4)
    attention.qkv = nn.Linear(32, 48)  # this rank's q, k and v of 2 heads
    localize_heads(attention, 2)
    assert attention.num_heads == 2
    _explain_width_errors(attention, "blocks.0.attn", 2)
    with pytest.raises(
        TensorParallelError,
        match=r"blocks.0.attn \(FusedQKVAttention\) failed under tensor parallelism.*reshape\(B, N, C\)",
    ):
        attention(torch.randn(2, 5, 32))


class _Holder(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.blocks = nn.ModuleList([cls(), cls()])


@pytest.mark.parametrize("name,module", [("block", "blocks.0.attn"), ("torch_encoder", "encoder.layers.0.self_attn"),
                                         ("hf_vit", "vit.layers.0.attention")])
def test_heads_that_do_not_divide_by_tp_are_refused(name, module):
    from lightning_seqpar.tensor_parallel import (
        TensorParallelError,
        check_heads,
        infer_tensor_parallel_plan,
    )
    from tests.tp_workers import build

    model = build(name)  # 4 heads of width 8
    plan = infer_tensor_parallel_plan(model)
    assert len(check_heads(model, plan, 2)) == 2  # one attention per block
    with pytest.raises(
        TensorParallelError, match=rf"{module} \(\w+\) has \w+=4 heads, which do not divide by tensor_parallel_size=3"
    ):
        check_heads(model, plan, 3)


# ---------------------------------------------------------------------------------------------------------
# Multi-process: against single-process training.
# ---------------------------------------------------------------------------------------------------------

WORKER = "tests.tp_workers:parallel_worker"
# One launch per world size, several layouts and models in it (process start-up dominates on a loaded 2-core machine).
LAYOUTS = {
    "tp2": (
        2,
        {"tp": 2},
        [
            {"name": "block", "reload": True},
            {"name": "block", "reload": True, "tp_sequence_parallel": False},
            {"name": "block", "user_plan": True},  # a torchtitan-style Megatron plan of the user's own
            {"name": "block", "optimizer": "adamw"},
            {"name": "torch_encoder", "reload": True},
            {"name": "hf_vit", "reload": True},
            {"name": "hf_dinov2", "reload": True},
            {"name": "climax"},
        ],
    ),
    "tp2xdp2": (4, {"tp": 2, "dp": 2}, [{"name": "block"}, {"name": "hf_vit"}]),
    # Heads split over tp first (4 -> 2 per rank), then the distributed attention over the sp ranks on those heads.
    "tp2xsp2": (
        4,
        {"tp": 2, "sp": 2},
        [{"name": "block"}, {"name": "torch_encoder", "attention": "lss"}, {"name": "hf_vit"}],
    ),
}
CASES = [(layout, i) for layout, (_, _, runs) in LAYOUTS.items() for i in range(len(runs))]


@pytest.fixture(scope="module")
def layout_runs():
    """``layout_runs(layout)``: each rank's results of that layout's runs. The layouts of one world size run in one
    launch, each rank running them in turn (process start-up dominates on a loaded 2-core machine)."""
    cache: dict[str, list] = {}

    def get(layout):
        if layout not in cache:
            world = LAYOUTS[layout][0]
            names = [name for name, (w, _, _) in LAYOUTS.items() if w == world]
            calls = [(WORKER, {"runs": LAYOUTS[name][2], **LAYOUTS[name][1]}) for name in names]
            cache.update(zip(names, run_distributed_each(calls, world, timeout=400 * (len(calls) + 1))))
        return cache[layout]

    return get


@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
@pytest.mark.parametrize(
    "layout,index",
    CASES,
    ids=[
        f"{layout}-{LAYOUTS[layout][2][i]['name']}-{LAYOUTS[layout][2][i].get('optimizer', 'sgd')}"
        for layout, i in CASES
    ],
)
def test_equals_single_process(layout_runs, layout, index):
    per_rank = [ranks[index] for ranks in layout_runs(layout)]
    run = LAYOUTS[layout][2][index]
    if LAYOUTS[layout][1].get("tp") == 2:
        heads = per_rank[0]["local_heads"]
        assert heads and all(h == 2 for h in heads[-2:]), heads  # 4 heads / tp 2 in the split blocks
        check_token_sharding(per_rank, 2, run.get("tp_sequence_parallel", True))
    check_against_single_process(per_rank, run["name"], run.get("optimizer", "sgd"))


def check_token_sharding(per_rank: list[dict], tp: int, sequence_parallel: bool) -> None:
    """Inside the blocks every LayerNorm of a tp rank sees its ``torch.chunk`` share of the L_r tokens the block stack
    was given (Megatron-LM sequence parallelism), or all L_r (replicated activations)."""
    from lightning_seqpar.tensor_parallel.sequence import _chunk_sizes

    for start in range(0, len(per_rank), tp):  # tp is the innermost mesh dimension: consecutive ranks
        group = per_rank[start:start + tp]
        assert [r["tp_rank"] for r in group] == list(range(tp))
        stack_tokens = {r["norm_tokens"][0] for r in group}
        assert len(stack_tokens) == 1, group  # one sp shard per tp group, replicated over it
        whole = stack_tokens.pop()
        seen = [set(r["norm_tokens"][1:]) for r in group]
        assert all(len(s) == 1 for s in seen), seen  # every norm of a rank sees the same count
        want = _chunk_sizes(whole, tp) if sequence_parallel else [whole] * tp
        assert [s.pop() for s in seen] == want, (whole, want)


def test_mixed_dtensor_groups_step_per_parameter_and_fused_is_refused():
    """CUDA's multi-tensor optimizer kernels refuse lists that mix DTensors and plain tensors (seen with the real
    timm ViT on two H200s); the groups holding the mix step parameter by parameter, a fused group is refused."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_seqpar.tensor_parallel.optim import step_per_parameter_where_mixed
    from tests.dist_utils import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 2), mesh, [Shard(0)]))
        plain, other = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
        opt = torch.optim.SGD([{"params": [sharded, plain]}, {"params": [other]}], lr=0.1)
        assert step_per_parameter_where_mixed(opt) == [0]
        assert opt.param_groups[0]["foreach"] is False and opt.param_groups[1]["foreach"] is None
        fused = torch.optim.AdamW([sharded, plain], lr=0.1, fused=True)
        with pytest.raises(ValueError, match="fused=True.*FSDP2"):
            step_per_parameter_where_mixed(fused)
    finally:
        dist.destroy_process_group()


def test_chunk_sizes_follow_torch_chunk():
    from lightning_seqpar.tensor_parallel.sequence import _chunk_sizes

    for length in range(0, 12):
        for parts in (1, 2, 3, 4):
            want = [c.shape[0] for c in torch.arange(length).chunk(parts)] if length else []
            want += [0] * (parts - len(want))
            assert _chunk_sizes(length, parts) == want, (length, parts)


def test_sequence_parallel_refuses_what_it_cannot_shard():
    """Parameters a tp rank would see only its tokens of, outside norms and layer scales, are named; plan styles the
    conversion does not know are named with the way out."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    from lightning_seqpar.tensor_parallel import TensorParallelError
    from lightning_seqpar.tensor_parallel.sequence import TokenCount, token_local_modules, token_sharded_plan
    from lightning_seqpar.weather.models.layers import Block
    from tests.dist_utils import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        block = Block(8, 2)
        parallelize_module(block, init_device_mesh("cpu", (1,)), {
            "attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
            "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel(),
        })
        assert token_local_modules(block, "blocks.0") == ["norm1", "norm2"]
        block.gamma_1 = nn.Parameter(torch.ones(8))  # BEiT-style scale directly on the block
        with pytest.raises(TensorParallelError, match=r"blocks\.0 \(Block\) holds parameters \['gamma_1'\].*"
                                                      r"tp_sequence_parallel=False"):
            token_local_modules(block, "blocks.0")
        del block.gamma_1
        block.mixer = nn.Linear(8, 8)  # a 2-D weight outside the projections
        with pytest.raises(TensorParallelError, match=r"blocks\.0\.mixer \(Linear\) holds parameters"):
            token_local_modules(block, "blocks.0")
    finally:
        dist.destroy_process_group()
    plan = {"blocks.*.attn": PrepareModuleInput(), "blocks.*.attn.qkv": ColwiseParallel()}
    with pytest.raises(TensorParallelError, match=r"cannot convert the tp_plan entry 'blocks\.\*\.attn'"):
        token_sharded_plan(plan, TokenCount(), "blocks.*")
    plan = {"blocks.*.attn.qkv": ColwiseParallel(), "blocks.*.linear1": ColwiseParallel()}
    styles, gathers = token_sharded_plan(plan, TokenCount(), "blocks.*")
    assert gathers == ["blocks.*.attn"]  # one all-gather at the attention's entry; a projection on the block gathers
    assert "input_layouts=Shard(1)" in repr(styles["blocks.*.linear1"])  # its own input


def test_gathered_tokens_are_made_contiguous():
    """torch 2.11's uneven all-gather leaves the gathered tokens strided, which its DTensor linear cannot view flat
    (seen on two H200s with 129 tokens): the gather points hand on a contiguous copy, with gradients intact."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from lightning_seqpar.tensor_parallel.sequence import _contiguous
    from tests.dist_utils import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        base = torch.randn(2, 8, 6, requires_grad=True)
        strided = base[:, :5]  # [2, 5, 6] cut along the tokens: not contiguous
        # the gathered DTensor claims the whole tensor's contiguous strides while its local tensor is strided
        x = DTensor.from_local(strided, init_device_mesh("cpu", (1,)), [Replicate()], run_check=False,
                               shape=strided.shape, stride=(30, 6, 1))
        weight = distribute_tensor(torch.randn(4, 6), x.device_mesh, [Shard(0)])
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            torch.nn.functional.linear(x, weight)  # what the real timm ViT hit in its qkv projection
        y = _contiguous(x)
        assert not strided.is_contiguous() and y.to_local().is_contiguous()
        assert torch.nn.functional.linear(y, weight).shape == (2, 5, 4)
        torch.testing.assert_close(y.to_local(), strided)
        y.to_local().sum().backward()
        assert torch.equal(base.grad[:, :5], torch.ones(2, 5, 6)) and not base.grad[:, 5:].any()
        z = DTensor.from_local(torch.randn(2, 5, 6), init_device_mesh("cpu", (1,)), [Replicate()], run_check=False)
        assert _contiguous(z) is z  # no copy when there is nothing to fix
    finally:
        dist.destroy_process_group()


def test_fewer_tokens_than_tensor_parallel_ranks_is_refused_before_any_collective():
    """A tp rank left without tokens by torch.chunk's split (1 token over 2, 9 over 4: 3, 3, 3, 0) would wait forever
    in DTensor's all-gather (found by a new user's trial); the first block refuses it, on every rank alike, before
    any collective."""
    from lightning_seqpar.tensor_parallel import TensorParallelError
    from lightning_seqpar.tensor_parallel.sequence import TokenCount, check_every_rank_holds_tokens, shard_block_stack

    for length, tp in ((13, 2), (2, 2), (10, 4), (8, 8), (50, 8)):
        check_every_rank_holds_tokens(length, tp, "blocks.0")
    with pytest.raises(TensorParallelError, match=r"9 tokens .* tensor_parallel_size=4 as \[3, 3, 3, 0\].*at least 10"):
        check_every_rank_holds_tokens(9, 4, "blocks.0")

    class TwoRanks:  # the entry checks before it touches the mesh's process group
        def size(self):
            return 2

    stack = nn.Sequential(nn.Identity(), nn.Identity())
    shard_block_stack(stack, TwoRanks(), TokenCount(), "blocks")
    with pytest.raises(TensorParallelError, match=r"blocks\.0 got 1 tokens.*tp_sequence_parallel=False"):
        stack(torch.randn(1, 1, 4))
