"""A model built on the meta device in ``configure_model`` (``with torch.device("meta")``), through the strategy line.

Fault this guards (found by a new user's trial): every engine moved the module with ``module.to(device)``, which
fails on meta tensors ("Cannot copy out of meta tensor; no data!"), so the FSDP2 recipe for models too big for one
device worked with ``apply_fsdp`` by hand but not from ``SeqParStrategy(fsdp=True)``. Now the FSDP2 engine allocates
and initialises each rank's shards after sharding, and the DDP engine with tensor parallelism after the split (the
``tp`` ranks then agree on the parameters they replicate). Each run records its whole weights at the start of training
(a collective); single-process training from those weights on the same batches must end where the run ended (relative
error 1e-5), and every rank must hold the same weights. A model whose parameters nothing would initialise is refused,
naming them. CPU, gloo, 2 ranks, the bundled-Block ViT (13 tokens), SGD with momentum, 3 steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule

from tests.dist_utils import run_distributed

STEPS, BATCH, TOLERANCE = 3, 2, 1e-5
CONFIGS = [
    {"fsdp": True, "sequence_parallel_size": 1},
    {"fsdp": True, "tensor_parallel_size": 2, "sequence_parallel_size": 1},
    {"tensor_parallel_size": 2, "sequence_parallel_size": 1},
]


def build(initialisable: bool):
    from tests.tp_workers import BundledBlockViT

    class Initialisable(BundledBlockViT):
        def init_weights(self) -> None:  # every parameter, also pos_embed (held by no module with reset_parameters)
            for module in self.modules():
                if module is not self and callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
            torch.nn.init.normal_(self.pos_embed, std=0.1)

    return Initialisable() if initialisable else BundledBlockViT()


class MetaModule(LightningModule):
    def __init__(self, initialisable: bool = True) -> None:
        super().__init__()
        self.initialisable, self.model, self.seen = initialisable, None, []

    def configure_model(self) -> None:
        if self.model is None:
            with torch.device("meta"):
                self.model = build(self.initialisable)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return F.mse_loss(self.model(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class RecordStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.strategy.full_state_dict()


def meta_worker() -> list[dict]:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy
    from tests.tp_workers import dataset

    torch.set_num_threads(1)

    def fit(module, config, callbacks=()):
        trainer = Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                          strategy=SeqParStrategy(timeout=300, **config))
        trainer.fit(module, DataLoader(dataset("block"), batch_size=BATCH))
        return trainer

    import os

    results = []
    for config in CONFIGS:
        module, start = MetaModule(), RecordStart()
        trainer = fit(module, config, [start])
        dp_rank = trainer.strategy.topology.dp_rank
        results.append({"seen": module.seen, "dp_rank": dp_rank, "start": start.start,
                        "final": trainer.strategy.full_state_dict()})
    try:
        fit(MetaModule(initialisable=False), CONFIGS[0])
        refused = None
    except ValueError as error:
        refused = str(error)
    results.append({"refused": refused, "rank": int(os.environ.get("RANK", 0))})
    return results


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_meta_device_model_from_configure_model_trains_like_one_process():
    from tests.test_tensor_parallel import max_rel_error
    from tests.tp_workers import dataset

    per_rank = run_distributed("tests.test_trial21_meta:meta_worker", 2, timeout=800)
    data = dataset("block")
    for i, config in enumerate(CONFIGS):
        ranks = [r[i] for r in per_rank]
        for r in ranks[1:]:  # one model: every rank holds the same whole weights, at the start and the end
            assert max_rel_error(r["start"], ranks[0]["start"])[0] == 0.0, config
        assert all(torch.isfinite(v).all() for v in ranks[0]["start"].values()), config
        by_dp = {r["dp_rank"]: r for r in ranks}
        batches = [sum((by_dp[d]["seen"][t] for d in sorted(by_dp)), []) for t in range(STEPS)]
        model = build(True)
        model.load_state_dict({k.removeprefix("model."): v for k, v in ranks[0]["start"].items()})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for indices in batches:
            optimizer.zero_grad()
            F.mse_loss(model(data.x[indices]), data.y[indices]).backward()
            optimizer.step()
        want = {f"model.{k}": v for k, v in model.state_dict().items()}
        for rank, r in enumerate(ranks):
            err, key = max_rel_error(r["final"], want)
            assert err < TOLERANCE, f"{config} rank {rank}: {key} off by relative error {err:.2e}"
    refused = per_rank[0][-1]["refused"]
    assert refused is not None and "pos_embed" in refused and "init_weights()" in refused, refused
