"""Plans: parsing, inference on common model shapes, application and removal, and every error message.

Runs in one process with a world-1 gloo group, so the whole distributed code path runs with P = 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seqpar import (
    NoDistributedAttentionError,
    PlanError,
    SequenceParallelPlan,
    UnsupportedAttentionError,
    apply_sequence_parallel,
    infer_plan,
    register_attention,
)
from tests.models import ManualSoftmaxAttention, TinyViT, TorchEncoderModel


def test_role_strings_parse_and_print():
    plan = SequenceParallelPlan(
        {"blocks.0": "shard_input:1, checkpoint", "blocks.*.attn": ["attention"], "pos": "sequence_parameter:2"}
    )
    assert plan.to_dict() == {
        "blocks.0": "shard_input:1, checkpoint",
        "blocks.*.attn": "attention",
        "pos": "sequence_parameter:2",
    }
    text = str(plan)
    assert "blocks.*.attn  attention" in text and text.splitlines()[0].startswith("path")
    assert SequenceParallelPlan({"a": "gather_output"})["a"][0].dim == 1


@pytest.mark.parametrize(
    "role,message",
    [
        ("shard", "unknown plan role 'shard'"),
        ("gather_output:x", "must be an integer"),
        ("attention:1", "takes no dimension"),
    ],
)
def test_bad_roles(role, message):
    with pytest.raises(PlanError, match=message):
        SequenceParallelPlan({"a": role})


def test_infer_timm_style():
    plan = infer_plan(TinyViT())
    assert plan.to_dict() == {
        "blocks.0": "shard_input:1, shard_arguments",
        "blocks.0.attn": "attention",
        "blocks.1": "shard_arguments, gather_output:1",
        "blocks.1.attn": "attention",
    }


def test_infer_torch_encoder():
    plan = infer_plan(TorchEncoderModel()).to_dict()
    assert (
        plan["encoder.layers.0"] == "shard_input:1, shard_arguments"
        and plan["encoder.layers.1.self_attn"] == "attention"
    )


def test_infer_unknown_attention_intercepts_sdpa():
    from tests.models import SeparateProjectionAttention

    class Mixer(SeparateProjectionAttention):  # a class name that does not say "attention"
        pass

    plan = infer_plan(TinyViT(Mixer)).to_dict()
    assert (
        plan["blocks.0"] == "shard_input:1, shard_arguments, sdpa"
        and plan["blocks.1"] == "shard_arguments, sdpa, gather_output:1"
    )


def test_infer_container_blocks_shard_at_their_owner():
    from tests.models import build_model

    plan = infer_plan(build_model("container_vit")).to_dict()
    assert plan == {
        "transformer": "shard_input:1, gather_output:1",
        "transformer.layers.0.0": "attention",
        "transformer.layers.1.0": "attention",
    }


def test_shard_on_a_container_is_refused(group):
    from tests.models import build_model

    plan = SequenceParallelPlan(
        {"transformer.layers.0": "shard_input", "transformer": "gather_output", "transformer.layers.*.0": "attention"}
    )
    with pytest.raises(PlanError, match="'transformer.layers.0' .* is a ModuleList, which is never called"):
        apply_sequence_parallel(build_model("container_vit"), plan, group)


def test_attention_outside_the_region_is_refused(group):
    from tests.models import build_model

    model = build_model("timm_vit")
    plan = SequenceParallelPlan({"blocks.1": "shard_input, gather_output", "blocks.*.attn": "attention"})
    applied = apply_sequence_parallel(model, plan, group)
    with pytest.raises(NoDistributedAttentionError, match="ran outside the sequence-parallel region"):
        model(torch.randn(1, 13, 6))
    applied.remove()


def test_no_block_stack():
    with pytest.raises(PlanError, match="found no stack of repeated transformer blocks .* Pass an explicit plan"):
        infer_plan(nn.Sequential(nn.Linear(2, 2)))


def test_plan_paths_must_exist(group):
    with pytest.raises(PlanError, match=r"'blocks\.9' \(shard_input:1\) matches no module of TinyViT"):
        apply_sequence_parallel(
            TinyViT(),
            SequenceParallelPlan(
                {"blocks.9": "shard_input", "blocks.1": "gather_output", "blocks.*.attn": "attention"}
            ),
            group,
        )


def test_plan_needs_shard_gather_and_attention(group):
    with pytest.raises(PlanError, match="needs a shard point"):
        apply_sequence_parallel(TinyViT(), SequenceParallelPlan({"blocks.*.attn": "attention"}), group)
    with pytest.raises(PlanError, match="at least one 'attention' or 'sdpa'"):
        apply_sequence_parallel(
            TinyViT(), SequenceParallelPlan({"blocks.0": "shard_input", "blocks.1": "gather_output"}), group
        )


def test_unknown_kernel(group):
    with pytest.raises(PlanError, match="unknown sequence-parallel attention 'ring-x'"):
        apply_sequence_parallel(TinyViT(), infer_plan(TinyViT()), group, attention="ring-x")


@pytest.mark.parametrize("name", ["timm_vit", "torch_encoder", "sdpa_vit", "container_vit", "hf_vit"])
@pytest.mark.parametrize("attention", ["ulysses", "lss"])
def test_applied_at_p1_matches_plain_and_removes_cleanly(group, name, attention):
    from tests.models import build_model

    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(2, 3, 24, 24) if name in ("container_vit", "hf_vit") else torch.randn(2, 13, 6)
    keys = list(model.state_dict())
    expected = model(x)
    applied = apply_sequence_parallel(model, infer_plan(model), group, attention=attention)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert applied.runtime.attention_calls == 2  # both blocks ran the distributed attention
    assert list(model.state_dict()) == keys  # checkpoints stay loadable into the plain model
    applied.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x), expected)


def test_hand_written_softmax_core_is_intercepted(group):
    """softmax(Q K^T) V written by hand (no SDPA call) runs distributed through its two products."""
    torch.manual_seed(0)
    model = TinyViT(ManualSoftmaxAttention)
    x = torch.randn(2, 13, 6)
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    applied = apply_sequence_parallel(model, infer_plan(model), group)
    model(x).square().mean().backward()
    assert applied.runtime.attention_calls == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)
    applied.remove()


class _EinsumAttention(ManualSoftmaxAttention):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (f(x).view(B, N, self.h, C // self.h) for f in (self.to_q, self.to_k, self.to_v))
        attn = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
        return self.out(torch.einsum("bhij,bjhd->bihd", attn, v).reshape(B, N, C))


def test_attention_core_not_found_is_refused(group):
    model = TinyViT(_EinsumAttention)
    applied = apply_sequence_parallel(model, infer_plan(model), group)
    with pytest.raises(
        NoDistributedAttentionError, match="no attention in it was made distributed.*register_attention"
    ):
        model(torch.randn(1, 13, 6))
    applied.remove()


def test_registered_attention_class(group):
    calls = []

    def forward(module, attend, x):
        B, N, C = x.shape
        q, k, v = (f(x).view(B, N, module.h, C // module.h) for f in (module.to_q, module.to_k, module.to_v))
        calls.append(N)
        return module.out(attend(q, k, v).reshape(B, N, C))

    register_attention(ManualSoftmaxAttention, forward)
    try:
        model = TinyViT(ManualSoftmaxAttention).eval()
        x = torch.randn(2, 13, 6)
        expected = model(x)
        plan = infer_plan(model)
        assert plan["blocks.0.attn"][0].kind == "attention"
        applied = apply_sequence_parallel(model, plan, group)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        assert calls == [13, 13]
        applied.remove()
    finally:
        from lightning_seqpar.plan import _ATTENTION_ADAPTERS

        _ATTENTION_ADAPTERS.pop(ManualSoftmaxAttention)


class _MaskedSDPA(nn.Module):
    def forward(self, x):
        q = x.view(1, x.shape[1], 2, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(x.shape[1], x.shape[1], dtype=torch.bool))


def test_unsupported_options_are_named(group):
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.Module()
    model.blocks = nn.ModuleList([mha, nn.MultiheadAttention(8, 2, batch_first=True)])
    applied = apply_sequence_parallel(
        model, SequenceParallelPlan({"blocks.0": "shard_input, gather_output, attention"}), group
    )
    x = torch.randn(1, 5, 8)
    with pytest.raises(UnsupportedAttentionError, match="key_padding_mask/attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(5, 5))
    with pytest.raises(UnsupportedAttentionError, match="cross-attention"):
        mha(x, torch.randn(1, 5, 8), torch.randn(1, 5, 8))
    out, weights = mha(x, x, x)
    assert out.shape == x.shape and weights is None
    aliased, _ = mha(
        x, x.view_as(x), x.view_as(x)
    )  # aliases of one tensor (as ZeRO-3's hooks pass them) are self-attention
    torch.testing.assert_close(aliased, out)
    with pytest.raises(UnsupportedAttentionError, match="cross-attention"):
        mha(x, x.clone(), x)  # equal values in other memory: genuinely another tensor
    applied.remove()

    holder = nn.Module()
    holder.blocks = nn.ModuleList([nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2)])
    with pytest.raises(UnsupportedAttentionError, match=r"blocks.0 is nn.MultiheadAttention\(batch_first=False\)"):
        apply_sequence_parallel(
            holder, SequenceParallelPlan({"blocks.0": "shard_input, gather_output, attention"}), group
        )

    masked = nn.Module()
    masked.blocks = nn.ModuleList([_MaskedSDPA(), _MaskedSDPA()])
    applied = apply_sequence_parallel(
        masked, SequenceParallelPlan({"blocks.0": "shard_input, gather_output, sdpa"}), group
    )
    x = torch.randn(1, 4, 8)
    expected = _MaskedSDPA()(x)  # on one rank the mask covers the whole sequence: SDPA runs with it, unchanged
    torch.testing.assert_close(masked.blocks[0](x), expected)
    applied.remove()


def test_sequence_shorter_than_sp_is_refused():
    from lightning_seqpar.parallelize import SequenceParallelRuntime
    from lightning_seqpar.topology import TopologyError

    class FakeGroupRuntime(SequenceParallelRuntime):
        pass

    runtime = FakeGroupRuntime(group=None)
    import lightning_seqpar.parallelize.runtime as runtime_module

    original = runtime_module.group_size
    runtime_module.group_size = lambda group: 4
    try:
        with pytest.raises(TopologyError, match="3 tokens cannot be split over sequence_parallel_size=4"):
            runtime.shard(torch.randn(1, 3, 8), 1)
    finally:
        runtime_module.group_size = original


def test_activation_checkpointing_matches(group):
    from lightning_seqpar.strategy import _with_checkpoints

    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(2, 13, 6)
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plan = _with_checkpoints(infer_plan(model), model)
    assert plan.to_dict()["blocks.0"] == "shard_input:1, shard_arguments, checkpoint"
    applied = apply_sequence_parallel(model, plan, group)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)
    assert applied.runtime.attention_calls == 4  # two blocks, each recomputed once in backward
    applied.remove()


@pytest.mark.parametrize("mode", ["save_attention", "offload"])
def test_checkpoint_modes_and_chunked_mlp_match(group, mode):
    from lightning_seqpar.strategy import _with_checkpoints

    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(2, 13, 6)
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plan = _with_checkpoints(infer_plan(model), model, mode).to_dict()
    plan["blocks.*.mlp"] = "chunk:3"
    applied = apply_sequence_parallel(model, SequenceParallelPlan(plan), group)
    assert f"checkpoint_{mode}" in plan["blocks.1"]
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6)
    applied.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_bad_chunk_role():
    with pytest.raises(PlanError, match="'chunk:0': the value after ':' must be a positive number of slices"):
        SequenceParallelPlan({"mlp": "chunk:0"})


def test_autocast_mixed_qkv_dtypes_match_plain(group):
    """Under autocast a q normalisation (LayerNorm, autocast's float32 list) leaves q in float32 next to bf16 k and
    v; plain SDPA casts all three to the autocast dtype, and the distributed attention must do the same."""
    class Float32(torch.nn.Module):  # what LayerNorm does under CUDA autocast
        def forward(self, t):
            return t.float()

    torch.manual_seed(0)
    model = TinyViT()
    for block in model.blocks:
        block.attn.q_norm = Float32()
    x = torch.randn(2, 13, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        applied = apply_sequence_parallel(model, infer_plan(model), group)
        got = model(x)
    applied.remove()
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_compile_role_wraps_blocks_and_is_refused_on_a_container(group):
    from lightning_seqpar.strategy import _with_block_role

    with pytest.raises(PlanError, match="is a ModuleList, which is never called"):
        apply_sequence_parallel(
            TinyViT(), SequenceParallelPlan({**infer_plan(TinyViT()).to_dict(), "blocks": "compile"}), group
        )
    with pytest.raises(PlanError, match="no stack of transformer blocks found in Linear"):
        _with_block_role(SequenceParallelPlan({}), torch.nn.Linear(2, 2), "compile")
    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(2, 13, 6)
    expected = model(x)
    plan = _with_block_role(infer_plan(model), model, "compile")
    assert plan.to_dict()["blocks.1"] == "shard_arguments, gather_output:1, compile"
    applied = apply_sequence_parallel(model, plan, group)
    assert all("forward" in block.__dict__ for block in model.blocks)  # the compiled forward sits on each block
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    applied.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(
    "heads,sp,backend,expected",
    [
        ([6], 2, "auto", ("ulysses", None)),
        ([3], 4, "auto", ("hybrid", 2)),
        ([12, 3], 8, "auto", ("hybrid", 2)),
        ([2], 3, "auto", ("ring", None)),
        ([3], 4, "sdpa", ("lss", None)),
        ([], 4, "auto", ("lss", None)),
        ([1], 1, "auto", ("ulysses", None)),
    ],
)
def test_auto_attention_choice(heads, sp, backend, expected):
    from lightning_seqpar.plan import choose_attention

    kind, degree, reason = choose_attention(heads, sp, backend)
    assert (kind, degree) == expected and reason


def test_head_counts_are_read_from_the_attention_modules():
    from lightning_seqpar.plan import attention_head_counts
    from tests.models import build_model

    for name, heads in (("timm_vit", 4), ("torch_encoder", 4), ("hf_vit", 4), ("container_vit", 4)):
        model = build_model(name)
        counts = attention_head_counts(model, infer_plan(model).resolve(model))
        assert counts and set(counts) == {heads}, (name, counts)


class _SDPAWith(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.options, self.qkv = options, nn.Linear(8, 24)

    def forward(self, x):  # [B, L, 8], 2 heads of 4
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, **self.options).transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("options", [{"is_causal": False, "attn_mask": None}, {"is_causal": True}, {"scale": 0.3},
                                     {"dropout_p": 0.0, "enable_gqa": False}])
def test_sdpa_keywords_are_honoured(group, options):
    """What a new release passes (timm's is_causal=False, an explicit scale) is honoured, never refused."""
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([_SDPAWith(**options), _SDPAWith(**options)])
    x = torch.randn(2, 5, 8)
    expected = model.blocks[0](x)
    applied = apply_sequence_parallel(
        model, SequenceParallelPlan({"blocks.0": "shard_input, gather_output, attention"}), group
    )
    torch.testing.assert_close(model.blocks[0](x), expected)
    assert applied.runtime.attention_calls == 1
    applied.remove()


def test_unknown_sdpa_keyword_is_refused_by_name(group):
    """An option a future torch adds to SDPA reaches the interception as a keyword: refused by name when it would
    change the result, passed when it is a no-op value (today's torch rejects unknown keywords itself, so the
    interception is called directly)."""
    from lightning_seqpar.adapters import DistributedSDPA

    q = torch.randn(1, 2, 5, 4)
    mode = DistributedSDPA(lambda q, k, v, **kw: q)  # the attend of a runtime: [B, L_r, H, d] in and out
    with pytest.raises(
        UnsupportedAttentionError, match=r"called with \['future_option'\] inside the sequence-parallel region"
    ):
        mode._sdpa(q, q, q, future_option=True)
    torch.testing.assert_close(mode._sdpa(q, q, q, future_option=None), q)


def test_auto_runs_dropout_calls_as_lss_when_it_chose_a_ring(group):
    """The ring kernels have no dropout: a kind that "auto" chose falls back to LSS for such calls, an explicit
    choice keeps refusing them."""
    from lightning_seqpar.comm import SequenceLayout
    from lightning_seqpar.parallelize import SequenceParallelRuntime

    q = torch.randn(1, 6, 2, 4)
    layout = SequenceLayout((6,))
    chosen = SequenceParallelRuntime(group, "ring", "math", dropout_fallback=True)
    with chosen.region(layout):
        assert chosen.attend(q, q, q, dropout_p=0.1).shape == q.shape
    explicit = SequenceParallelRuntime(group, "ring", "math")
    with explicit.region(layout), pytest.raises(NotImplementedError, match="does not implement attention dropout"):
        explicit.attend(q, q, q, dropout_p=0.1)
