"""Unit tests of the ClimaX model: shapes, padding, meta-device build and the token-locality its plan relies on."""

from __future__ import annotations

import fnmatch

import pytest
import torch

from lightning_seqpar.weather.models import Attention, ClimaX
from lightning_seqpar.weather.models.climax import Patchify

VARIABLES = ["t2m", "u10", "v10", "z_500", "t_850"]


def small_climax(img_size=(8, 16), patch_size=2, **kwargs) -> ClimaX:
    kwargs = {"embed_dim": 32, "depth": 2, "decoder_depth": 1, "num_heads": 4, "drop_path": 0.0, **kwargs}
    return ClimaX(VARIABLES, img_size, patch_size=patch_size, **kwargs)


@pytest.mark.parametrize(
    ("img_size", "patch_size", "variables", "out_variables"),
    [
        ((8, 16), 2, VARIABLES, VARIABLES),
        ((8, 16), 4, ["z_500", "t2m"], ["t2m"]),
        ((7, 13), 2, VARIABLES[:3], ["v10", "u10"]),  # not divisible: padded then cropped
        ((9, 18), 4, ["t_850"], VARIABLES),
        ((5, 6), 1, VARIABLES, ["t2m"]),
    ],
)
def test_forward_shapes(img_size, patch_size, variables, out_variables):
    model = small_climax(img_size, patch_size)
    x = torch.randn(2, len(variables), *img_size)
    out = model(x, torch.tensor([6.0, 72.0]), variables, out_variables)
    assert out.shape == (2, len(out_variables), *img_size)
    h, w = -(-img_size[0] // patch_size), -(-img_size[1] // patch_size)
    assert model.num_patches == h * w
    assert model.pos_embed.shape == (1, h * w, 32)
    out.square().mean().backward()
    assert model.token_embed.weight.grad is not None


def test_padding_replicates_bottom_right_and_crops():
    patchify = Patchify((3, 5), patch_size=2)
    x = torch.arange(15.0).reshape(1, 1, 3, 5)
    patches = patchify(x)  # grid padded to 4 x 6 -> 2 x 3 patches of 4 pixels
    assert patches.shape == (1, 1, 6, 4)
    # Last patch covers rows 2-3, cols 4-5: row 3 repeats row 2, col 5 repeats col 4.
    assert patches[0, 0, -1].tolist() == [14.0, 14.0, 14.0, 14.0]
    assert patches[0, 0, 0].tolist() == [0.0, 1.0, 5.0, 6.0]


def test_unpatchify_inverts_patchify():
    model = small_climax((7, 13), patch_size=2)
    x = torch.randn(2, len(VARIABLES), 7, 13)
    patches = model.patchify(x)  # [B, V, L, p*p]
    per_token = patches.permute(0, 2, 1, 3).reshape(2, model.num_patches, -1)  # [B, L, V*p*p]
    out_ids = model.variable_ids(["v10", "t2m"])
    assert torch.equal(model.unpatchify(per_token, out_ids), x[:, [2, 0]])


def test_variable_embedding_is_looked_up_by_name():
    model = small_climax()
    x = torch.randn(1, 2, 8, 16)
    lead = torch.tensor([24.0])
    swapped = model(x.flip(1), lead, ["u10", "t2m"], ["z_500"])
    assert torch.allclose(model(x, lead, ["t2m", "u10"], ["z_500"]), swapped, atol=1e-5)


def test_errors_are_clear():
    model = small_climax()
    with pytest.raises(KeyError, match=r"does not know variables \['q_700'\]"):
        model(torch.randn(1, 1, 8, 16), torch.zeros(1), ["q_700"], ["t2m"])
    with pytest.raises(ValueError, match=r"built for a \(8, 16\) grid"):
        model(torch.randn(1, 1, 8, 15), torch.zeros(1), ["t2m"], ["t2m"])
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 2, 8, 16), torch.zeros(1), ["t2m"], ["t2m"])
    with pytest.raises(ValueError, match="divisible by 4 and by num_heads"):
        small_climax(embed_dim=30)


def test_meta_device_build_then_init_matches_eager():
    eager = small_climax((7, 13))
    torch.manual_seed(0)
    eager.init_weights()
    with torch.device("meta"):
        lazy = small_climax((7, 13))
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    torch.manual_seed(0)
    lazy.init_weights()
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(1, len(VARIABLES), 7, 13)
    assert torch.isfinite(lazy(x, torch.ones(1), VARIABLES, VARIABLES)).all()


def test_dtype_is_threaded():
    model = small_climax(dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model(torch.randn(1, 5, 8, 16, dtype=torch.float64), torch.ones(1), VARIABLES, ["t2m"])
    assert out.dtype == torch.float64


def test_plan_names_real_modules_and_keeps_variable_aggregation_local():
    model = small_climax()
    plan = model.sequence_parallel_plan()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for path, role in plan.items():
        assert role.split(":")[0] in {"shard_output", "shard_input", "gather_output", "attention", "sequence_parameter"}
        matches = [n for n in list(modules) + list(params) if fnmatch.fnmatchcase(n, path)]
        assert matches, f"{path} matches nothing"
    attention = [n for n in modules if fnmatch.fnmatchcase(n, "blocks.*.attn")]
    assert attention == [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    assert all(isinstance(modules[n], Attention) for n in attention)
    assert not any(fnmatch.fnmatchcase("var_agg", p) for p in plan)
    attn = model.blocks[0].attn
    assert attn.qkv.out_features == 3 * attn.qkv.in_features
    assert (attn.num_heads, attn.head_dim, attn.scale) == (4, 8, 8**-0.5)


@pytest.mark.parametrize(("img_size", "patch_size", "parts"), [((8, 16), 2, 2), ((7, 13), 2, 2), ((6, 10), 2, 3)])
def test_manual_plan_emulation_equals_forward(img_size, patch_size, parts):
    """Shard after `patchify`, run the token-local part per shard with its `pos_embed` slice, gather after `head`."""
    torch.manual_seed(0)
    model = small_climax(img_size, patch_size, drop_rate=0.0).eval()
    variables, out_variables = ["t2m", "z_500", "u10"], ["z_500", "t2m"]
    x = torch.randn(2, 3, *img_size)
    lead = torch.tensor([6.0, 120.0])
    reference = model(x, lead, variables, out_variables)

    var_ids, out_ids = model.variable_ids(variables), model.variable_ids(out_variables)
    patches = model.patchify(x)  # [B, V, L, p*p]
    full_pos = model.pos_embed
    local = []
    for shard, pos in zip(patches.tensor_split(parts, dim=2), full_pos.tensor_split(parts, dim=1), strict=True):
        model._parameters["pos_embed"] = pos  # what "sequence_parameter:1" does while forward runs
        local.append(model.embed(shard, var_ids, lead))  # [B, L_r, D]
    model._parameters["pos_embed"] = full_pos
    tokens = torch.cat(local, dim=1)  # the attention of each block sees all L tokens
    for block in model.blocks:
        tokens = block(tokens)
    pred = torch.cat([model.head(model.norm(t)) for t in tokens.tensor_split(parts, dim=1)], dim=1)
    assert torch.allclose(model.unpatchify(pred, out_ids), reference, atol=1e-5)


def test_variable_aggregation_in_slices_is_exact():
    """Long inputs are aggregated in token slices (recomputed in backward) and attended in row slices:
    same outputs and gradients as one call."""
    from lightning_seqpar.weather.models.climax import VariableAggregation

    torch.manual_seed(0)
    whole = VariableAggregation(16, 2, chunk_tokens=None)
    sliced = VariableAggregation(16, 2, chunk_tokens=4)
    sliced.load_state_dict(whole.state_dict())
    sliced.MAX_ATTENTION_ROWS = 5  # also split the fused attention call
    x = torch.randn(2, 3, 10, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, out2 = whole(x), sliced(x2)
    torch.testing.assert_close(out2, out)
    out.square().sum().backward()
    out2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    for (name, p), p2 in zip(whole.named_parameters(), sliced.parameters()):
        torch.testing.assert_close(p2.grad, p.grad, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x2), whole(x))
