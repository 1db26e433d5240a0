"""Memory savers (lightning_seqpar.memory, lightning_seqpar.wrapping) compute the same function and gradients as the
plain model, on CPU in fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_seqpar.memory import MasterWeightAdamW
from lightning_seqpar.weather.models.layers import Block
from lightning_seqpar.wrapping import checkpoint_module, checkpointed_chunks, chunk_module, offload_checkpoint

WIDTH, HEADS, TOKENS = 32, 4, 37  # 37 tokens: chunks of unequal length


def _stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(WIDTH, HEADS) for _ in range(2)])


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()], (x.grad.clone() if x.grad is not None else None)


@pytest.mark.parametrize(
    "mode",
    ["checkpoint", "offload", "save_attention", "chunk", "checkpoint+chunk", "offload+chunk", "save_attention+chunk"],
)
@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_memory_savers_match_plain_model(mode, input_requires_grad):
    reference, model = _stack(), _stack()
    undo = []
    for block in model:
        if "chunk" in mode:
            undo.append(chunk_module(block.mlp, chunks=4))
        if mode.split("+")[0] != "chunk":
            undo.append(checkpoint_module(block, offload="offload" in mode, save_attention="save_attention" in mode))
    x = torch.randn(2, TOKENS, WIDTH)
    out_ref, grads_ref, dx_ref = _grads(reference, x.clone().requires_grad_(input_requires_grad))
    out, grads, dx = _grads(model, x.clone().requires_grad_(input_requires_grad))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    if input_requires_grad:
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    for fn in undo:
        fn()
    assert all("forward" not in m.__dict__ for m in model.modules()), "undo left a wrapped forward behind"


def test_checkpointed_chunks_passes_through_without_grad_or_with_one_chunk():
    mlp = nn.Linear(WIDTH, WIDTH)
    x = torch.randn(1, TOKENS, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(checkpointed_chunks(mlp, x, chunks=8), mlp(x))
    torch.testing.assert_close(checkpointed_chunks(mlp, x, chunks=1), mlp(x))


def test_offload_checkpoint_reaches_parameters_when_input_needs_no_grad():
    layer = nn.Linear(WIDTH, WIDTH)
    x = torch.randn(3, WIDTH)
    offload_checkpoint(layer, x).sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer.weight.grad, torch.ones(WIDTH, 1) * x.sum(0, keepdim=True))


def test_offload_keeps_only_the_block_input_in_host_memory(monkeypatch):
    """Through the offload hooks goes the block's input and nothing else (its intermediates are recomputed), and
    every parameter's gradient is accumulated once."""
    packed: list[torch.Tensor] = []
    original = torch.autograd.graph.save_on_cpu

    class Recording(original):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda t: (packed.append(t), pack(t))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    block = _stack()[0]
    x = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    accumulations = {name: 0 for name, _ in block.named_parameters()}
    for name, p in block.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda _, name=name: accumulations.__setitem__(name, accumulations[name] + 1)
        )
    undo = checkpoint_module(block, offload=True)
    out = block(x)
    assert len(packed) == 1 and packed[0] is x
    out.square().sum().backward()
    assert set(accumulations.values()) == {1}
    undo()


def test_offload_and_save_attention_are_exclusive():
    with pytest.raises(ValueError, match="cannot be combined"):
        checkpoint_module(nn.Linear(2, 2), offload=True, save_attention=True)


def test_master_weights_equal_plain_adamw_in_fp32():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    master = copy.deepcopy(plain)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    opt_master = MasterWeightAdamW(master.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(5, 8)
        for model, opt in ((plain, opt_plain), (master, opt_master)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(plain.parameters(), master.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_master_weights_keep_fp32_state_for_a_bf16_model():
    torch.manual_seed(0)
    model = nn.Linear(8, 8).to(torch.bfloat16)
    opt = MasterWeightAdamW([{"params": [model.weight], "weight_decay": 0.0}, {"params": [model.bias]}], lr=1e-4)
    before = [p.detach().float().clone() for p in opt.param_groups[0]["params"]]

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().mean()
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert all(m.dtype == torch.float32 and m.grad is None for m in masters)
    # A 1e-4 step is below bf16 resolution for most weights: the master moved, the bf16 copy is its rounding.
    assert (masters[0] - before[0]).abs().max() > 0
    torch.testing.assert_close(model.weight, masters[0].to(torch.bfloat16), rtol=0, atol=0)
    assert model.weight.grad is not None and model.weight.grad.dtype == torch.bfloat16


def test_chunks_may_put_tokens_on_another_output_dimension():
    """ClimaX's variable aggregation takes [B, V, L, D] and returns [B, L, D]."""
    torch.manual_seed(0)
    from lightning_seqpar.weather.models.climax import VariableAggregation

    agg = VariableAggregation(WIDTH, HEADS)
    x = torch.randn(2, 3, TOKENS, WIDTH, requires_grad=True)
    ref = agg(x)
    chunk_module(agg, chunks=4, dim=2, out_dim=1)
    torch.testing.assert_close(agg(x), ref, rtol=1e-5, atol=1e-6)
