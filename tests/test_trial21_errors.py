"""Errors a new user met with tensor parallelism (trial 21), on 2 gloo ranks:

- an attention holding its own parameters beside the projections tensor parallelism splits (timm Eva's ``q_bias`` /
  ``v_bias`` next to its fused ``qkv``) was refused with the advice to use ``tp_sequence_parallel=False``, which then
  failed in the forward with "aten.addmm.default got mixed torch.Tensor and DTensor"; it is now refused in both
  modes, up front, naming the parameters and the way out;
- an error inside ``fit`` (an attention reshaping to the input width) reached the user as
  "_apply(): Couldn't swap LayerNorm.weight" from Lightning's teardown (moving DTensor parameters while the first
  error's traceback holds their graph) instead of the error itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_utils import run_distributed

WIDTH, HEADS, TOKENS = 16, 4, 9


class SeparateBiasAttention(nn.Module):
    """timm Eva's attention layout: a fused qkv Linear without bias, and q / v biases of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, WIDTH // HEADS
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(WIDTH)), nn.Parameter(torch.zeros(WIDTH))
        self.register_buffer("k_bias", torch.zeros(WIDTH), persistent=False)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        B, N, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


class WidthReshapeAttention(nn.Module):
    """Reshapes the heads back to the input width ``C`` (older timm): cannot run on a column shard."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = HEADS
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, attention: type[nn.Module]) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(WIDTH), attention()
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Net(nn.Module):
    def __init__(self, attention: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(attention) for _ in range(2))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def errors_worker() -> dict:
    """What each case raised on this rank: ``(type name, message)``."""
    from lightning.pytorch import LightningModule, Trainer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_seqpar import SeqParStrategy
    from lightning_seqpar.tensor_parallel import apply_tensor_parallel
    from tests.dist_utils import init_gloo

    init_gloo()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    raised = {}
    for sequence_parallel in (True, False):
        try:
            apply_tensor_parallel(Net(SeparateBiasAttention), mesh, sequence_parallel=sequence_parallel)
            raised[f"separate-bias-sp{sequence_parallel}"] = None
        except Exception as error:  # noqa: BLE001 - the test asserts on what was raised
            raised[f"separate-bias-sp{sequence_parallel}"] = (type(error).__name__, str(error))

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Net(WidthReshapeAttention)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      strategy=SeqParStrategy(tensor_parallel_size=2, sequence_parallel_size=1, timeout=300))
    try:
        trainer.fit(Module(), DataLoader(TensorDataset(torch.randn(4, TOKENS, WIDTH)), batch_size=2))
        raised["fit"] = None
    except Exception as error:  # noqa: BLE001
        raised["fit"] = (type(error).__name__, str(error))
    return raised


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_tensor_parallel_errors_name_the_fault():
    per_rank = run_distributed("tests.test_trial21_errors:errors_worker", 2, timeout=500)
    for raised in per_rank:
        for sequence_parallel in (True, False):
            kind, message = raised[f"separate-bias-sp{sequence_parallel}"]
            assert kind == "TensorParallelError", (sequence_parallel, kind, message)
            assert "['q_bias', 'v_bias']" in message and "blocks.0.attn" in message, message
            assert "qkv_bias=False" in message and "tp_sequence_parallel=False" not in message, message
        kind, message = raised["fit"]
        assert kind == "TensorParallelError" and "reshape(B, N, C)" in message, (kind, message)
