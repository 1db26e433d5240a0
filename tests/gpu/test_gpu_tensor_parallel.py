"""Tensor parallelism and FSDP2 with the real timm ViT on 2 GPUs (NCCL), against the same steps on one GPU.

Run on the GPU machine (its image has timm), not in CI:

    NCCL_NVLS_ENABLE=0 python -m pytest -m gpu -s tests/gpu/test_gpu_tensor_parallel.py

timm ``VisionTransformer`` (64 x 128 image, patch 8: 128 patches + class token, width 384, 6 heads, depth 2) built
from one seed on every rank, split by :func:`lightning_seqpar.tensor_parallel.apply_tensor_parallel` over a
2-rank ``tp`` mesh (fused qkv split by head: 3 heads per GPU) or by :func:`lightning_seqpar.fsdp.apply_fsdp`
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
CASES = [("tp", "fp32"), ("tp", "bf16"), ("fsdp", "fp32"), ("fsdp", "bf16")]


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


def worker() -> dict:
    import os

    import timm
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_seqpar.fsdp import apply_fsdp
    from lightning_seqpar.tensor_parallel import apply_tensor_parallel

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=device)
    data = batches(device)
    reference = build().to(device)
    out = {"versions": {"torch": torch.__version__, "timm": timm.__version__, "gpu": torch.cuda.get_device_name()},
           "reference_losses": train(reference, data, autocast=False), "reference": full_state(reference)}
    for kind, precision in CASES:
        model = build().to(device)
        mesh = init_device_mesh("cuda", (2,), mesh_dim_names=("tp" if kind == "tp" else "dp_sp",))
        if kind == "tp":
            apply_tensor_parallel(model, mesh["tp"])
            out[(kind, precision, "heads")] = [b.attn.num_heads for b in model.blocks]
            local = model.blocks[0].attn.qkv.weight.to_local().shape
            out[(kind, precision, "qkv_local")] = tuple(local)
            losses = train(model, data, autocast=precision == "bf16")
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
    result = per_rank[0]
    print("versions:", result["versions"])
    assert result[("tp", "fp32", "heads")] == [3, 3]
    assert result[("tp", "fp32", "qkv_local")] == (3 * 384 // 2, 384)
    reference = result["reference"]
    for kind, precision in CASES:
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
