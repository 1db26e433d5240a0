"""Train an ordinary LightningModule sequence-parallel on 2 CPU processes: nothing in the model knows about it.

Run: python examples/own_model.py   (Lightning starts the second process itself)
"""

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_seqpar  # registers strategy="seqpar"


class TokenRegressor(LightningModule):
    """A small ViT-like model: embedding + position embedding, a TransformerEncoder, a per-token head."""

    def __init__(self, tokens: int = 50, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        self.head = nn.Linear(width, 1)

    def forward(self, x):  # [B, L, 8] -> [B, L, 1]
        return self.head(self.encoder(self.embed(x) + self.pos_embed))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    seed_everything(0)
    x = torch.randn(64, 50, 8)
    y = x.sum(-1, keepdim=True).cumsum(1) / 10  # depends on earlier tokens: attention must see all of them
    model = TokenRegressor()
    print(lightning_seqpar.infer_plan(model))  # what the strategy will do; it logs the same table at fit
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="seqpar",  # sequence_parallel_size = devices per node = 2, Ulysses attention
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    if trainer.is_global_zero:
        print(f"final train_loss {trainer.callback_metrics['train_loss'].item():.4f}")


if __name__ == "__main__":
    main()
