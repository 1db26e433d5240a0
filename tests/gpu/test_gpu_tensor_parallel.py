"""Tensor parallelism and FSDP2 with the real timm ViT on 2 GPUs (NCCL), against the same steps on one GPU.

Run on the GPU machine (its image has timm), not in CI:

    NCCL_NVLS_ENABLE=0 python -m pytest -m gpu -s tests/gpu/test_gpu_tensor_parallel.py

timm ``VisionTransformer`` (64 x 128 image, patch 8: 128 patches + class token, width 384, 6 heads, depth 2) built
from one seed on every rank, split by :func:`lightning_seqpar.tensor_parallel.apply_tensor_parallel` over a
2-rank ``tp`` mesh (fused qkv split by head: 3 heads per GPU; with Megatron-LM sequence parallelism, 65 / 64 of
the 129 tokens per GPU between the projections, and without it) or by :func:`lightning_seqpar.fsdp.apply_fsdp`
over 2 ranks, trained 3 SGD-with-momentum steps on the same batches. fp32 with TF32 off: every parameter within
relative error 1e-4 of one GPU (summation order only). bf16 (autocast for tp; FSDP2 ``param_dtype=bfloat16`` with
fp32 reduction): losses within 2e-2 of the fp32 single-GPU losses. Versions are printed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.timeout(600),
]

SEED, STEPS, BATCH = 2024, 3, 4
# tp: Megatron-LM sequence parallelism on (the default); tp_replicated: activations replicated over tp.
CASES = [("tp", "fp32"), ("tp", "bf16"), ("tp_replicated", "fp32"), ("fsdp", "fp32"), ("fsdp", "bf16")]


def build():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(SEED)
    return VisionTransformer(img_size=(64, 128), patch_size=8, embed_dim=384, depth=2, num_heads=6, num_classes=10)


def batches(device):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(BATCH, 3, 64, 128, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(STEPS)]
    return [(x.to(device), y.to(device)) for x, y in data]


def train(model, data, autocast: bool):
    from lightning_seqpar.tensor_parallel.optim import step_per_parameter_where_mixed

    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    step_per_parameter_where_mixed(opt)  # tp: sharded DTensors beside plain tensors (CUDA's foreach refuses the mix)
    losses = []
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def full_state(model):
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu()
            for k, v in model.state_dict().items()}


def worker(device_type: str = "cuda") -> dict:
    """Every case of ``CASES`` (fp32 ones only on ``device_type="cpu"``, over gloo) against this device alone."""
    import os

    import timm
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_seqpar.fsdp import apply_fsdp
    from lightning_seqpar.tensor_parallel import apply_tensor_parallel

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rank = int(os.environ["RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", device_id=device)
        name = torch.cuda.get_device_name()
    else:
        from tests.dist_utils import init_gloo

        init_gloo()
        torch.set_num_threads(1)
        device, name = torch.device("cpu"), "cpu"
    data = batches(device)
    reference = build().to(device)
    out = {"versions": {"torch": torch.__version__, "timm": timm.__version__, "gpu": name},
           "reference_losses": train(reference, data, autocast=False), "reference": full_state(reference)}
    for kind, precision in CASES:
        if device_type == "cpu" and precision != "fp32":
            continue
        model = build().to(device)
        mesh = init_device_mesh(device_type, (2,), mesh_dim_names=("tp" if kind.startswith("tp") else "dp_sp",))
        if kind.startswith("tp"):
            apply_tensor_parallel(model, mesh["tp"], sequence_parallel=kind == "tp")
            out[(kind, precision, "heads")] = [b.attn.num_heads for b in model.blocks]
            local = model.blocks[0].attn.qkv.weight.to_local().shape
            out[(kind, precision, "qkv_local")] = tuple(local)
            seen = []  # tokens the second norm of the first block holds on this rank (after SequenceParallel's hook)
            hook = model.blocks[0].norm2.register_forward_pre_hook(
                lambda m, args, seen=seen: seen.append(getattr(args[0], "_local_tensor", args[0]).shape[1]))
            losses = train(model, data, autocast=precision == "bf16")
            hook.remove()
            out[(kind, precision, "norm_tokens")] = seen[0]
        else:
            dtype = torch.bfloat16 if precision == "bf16" else None
            apply_fsdp(model, mesh["dp_sp"], param_dtype=dtype, reduce_dtype=torch.float32)
            losses = train(model, data, autocast=False)  # every rank the same batch: the average is the batch's
        out[(kind, precision)] = {"losses": losses, "final": full_state(model)}
    dist.destroy_process_group()
    return out


def test_tensor_parallel_and_fsdp2_with_real_timm_equal_one_gpu():
    per_rank = run_distributed("tests.gpu.test_gpu_tensor_parallel:worker", 2, timeout=500,
                               env={"NCCL_NVLS_ENABLE": "0"})
    check_real_timm_runs(per_rank)


def check_real_timm_runs(per_rank: list[dict]) -> None:
    """The assertions of :func:`worker`'s results (the cases it ran)."""
    result = per_rank[0]
    print("versions:", result["versions"])
    assert result[("tp", "fp32", "heads")] == [3, 3]
    assert result[("tp", "fp32", "qkv_local")] == (3 * 384 // 2, 384)
    # 128 patches + the class token: 65 and 64 tokens per rank between the projections, all 129 when replicated
    assert [r[("tp", "fp32", "norm_tokens")] for r in per_rank] == [65, 64]
    assert [r[("tp_replicated", "fp32", "norm_tokens")] for r in per_rank] == [129, 129]
    reference = result["reference"]
    for kind, precision in CASES:
        if (kind, precision) not in result:
            continue
        run = result[(kind, precision)]
        loss_error = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], result["reference_losses"]))
        if precision == "fp32":
            worst = max((run["final"][k] - v).norm().item() / max(v.norm().item(), 1e-12) for k, v in reference.items())
            print(f"{kind} {precision}: worst parameter relative error {worst:.2e}, losses {loss_error:.2e}")
            assert worst < 1e-4, (kind, worst)
            assert loss_error < 1e-4, (kind, loss_error)
        else:
            print(f"{kind} {precision}: losses within {loss_error:.2e} of fp32 one GPU")
            assert loss_error < 2e-2, (kind, loss_error)
        for other in per_rank[1:]:  # every rank holds the same whole model
            assert all(torch.equal(other[(kind, precision)]["final"][k], v) for k, v in run["final"].items())


STRATEGY_CASES = [  # name, strategy arguments, Trainer precision, engine
    ("tp2", {"tensor_parallel_size": 2}, "32-true", "SeqParDDPStrategy"),
    ("fsdp2", {"fsdp": True}, "32-true", "SeqParFSDPStrategy"),
    ("fsdp2_sp2", {"fsdp": True, "sequence_parallel_size": 2, "attention": "ulysses"}, "32-true",
     "SeqParFSDPStrategy"),
    ("tp2_bf16", {"tensor_parallel_size": 2}, "bf16-mixed", "SeqParDDPStrategy"),
    ("fsdp2_bf16", {"fsdp": True}, "bf16-mixed", "SeqParFSDPStrategy"),
]


def strategy_worker(device_type: str = "cuda") -> dict:
    """The same timm ViT through ``Trainer(strategy=SeqParStrategy(...))`` for every case of ``STRATEGY_CASES`` (the
    fp32 ones on ``device_type="cpu"``), then the same batches (in the order the strategy's sampler gave them) on this
    device alone in fp32."""
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, Dataset

    from lightning_seqpar import SeqParStrategy

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(BATCH * STEPS, 3, 64, 128, generator=g), torch.randint(0, 10, (BATCH * STEPS,), generator=g)

    class Data(Dataset):
        def __len__(self):
            return len(xs)

        def __getitem__(self, i):
            return {"index": i, "x": xs[i], "y": ys[i]}

    class Module(LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.seen, self.losses = build(), [], []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            loss = F.cross_entropy(self.model(batch["x"]), batch["y"])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

    out = {}
    if device_type == "cpu":
        torch.set_num_threads(1)
    for name, kwargs, precision, _ in STRATEGY_CASES:
        if device_type == "cpu" and precision != "32-true":
            continue
        module = Module()
        trainer = Trainer(accelerator="gpu" if device_type == "cuda" else "cpu", devices=2, precision=precision,
                          max_steps=STEPS, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          strategy=SeqParStrategy(timeout=300, **kwargs))
        trainer.fit(module, DataLoader(Data(), batch_size=BATCH))
        final = {k: v.float().cpu() for k, v in trainer.strategy.full_state_dict().items()}
        final = {k.removeprefix("model."): v for k, v in final.items()}
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        reference = build().to(device)
        data = [(xs[i].to(device), ys[i].to(device)) for i in (torch.tensor(s) for s in module.seen)]
        reference_losses = train(reference, data, autocast=False)
        expected = full_state(reference)
        worst = max((final[k] - v).norm().item() / max(v.norm().item(), 1e-12) for k, v in expected.items())
        loss_error = max(abs(a - b) / abs(b) for a, b in zip(module.losses, reference_losses))
        out[name] = {"worst": worst, "loss_error": loss_error, "engine": type(trainer.strategy).__name__,
                     "seen": module.seen}
    return out


def test_strategy_line_with_real_timm_equals_one_gpu():
    """fp32: every parameter within 1e-4 of one GPU; bf16-mixed: losses within 2e-2 and parameters within 2e-2 of the
    fp32 single-GPU run (bf16 rounding of the forward over 3 steps)."""
    per_rank = run_distributed("tests.gpu.test_gpu_tensor_parallel:strategy_worker", 2, timeout=550,
                               env={"NCCL_NVLS_ENABLE": "0"})
    check_strategy_runs(per_rank)


def check_strategy_runs(per_rank: list[dict]) -> None:
    """The assertions of :func:`strategy_worker`'s results (the cases it ran)."""
    for name, _, precision, engine in STRATEGY_CASES:
        if name not in per_rank[0]:
            continue
        bound = 1e-4 if precision == "32-true" else 2e-2
        for rank in per_rank:
            run = rank[name]
            print(f"{name} ({run['engine']}, {precision}): worst parameter relative error {run['worst']:.2e},"
                  f" losses {run['loss_error']:.2e}")
            assert run["engine"] == engine
            assert run["worst"] < bound, (name, run["worst"])
            assert run["loss_error"] < bound, (name, run["loss_error"])
        assert per_rank[0][name]["seen"] == per_rank[1][name]["seen"]  # dp = 1: both ranks hold the same samples
