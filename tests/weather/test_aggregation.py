"""Hierarchical (D-CHAG) variable aggregation of ClimaX: single-device behaviour, memory, and the channel-parallel
form against the same model on one device (gloo, 2 and 3 ranks, odd channel counts; one launch per world size, the
workers of a world running in turn)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from lightning_seqpar.weather.models import ClimaX
from lightning_seqpar.weather.models.aggregation import channel_group_sizes, local_channel_groups
from tests.dist_utils import CollectiveCounter, init_gloo, relative_error, run_distributed_each


def names(count: int) -> list[str]:
    return [f"field_{i}" for i in range(count)]


def small(num_vars: int = 7, aggregation: str = "hierarchical", img_size=(8, 12), **kwargs) -> ClimaX:
    options = {"patch_size": 2, "embed_dim": 32, "depth": 2, "decoder_depth": 1, "num_heads": 4, "drop_path": 0.0,
               "aggregation": aggregation, **kwargs}
    return ClimaX(names(num_vars), img_size, **options)


def test_flat_default_is_unchanged():
    model = small(aggregation="flat")
    assert "aggregation" not in model.config  # configurations (and checkpoints) of flat models are as before
    assert {k for k in model.state_dict() if k.startswith("var_agg.")} == {
        "var_agg.query", "var_agg.q.weight", "var_agg.q.bias", "var_agg.kv.weight", "var_agg.kv.bias",
        "var_agg.proj.weight", "var_agg.proj.bias",
    }
    assert model.sequence_parallel_plan()["patchify"] == "shard_output:2"


def test_group_sizes_and_rank_shares():
    assert channel_group_sizes(7, 2) == [2, 2, 2, 1]
    assert channel_group_sizes(48, 8) == [8] * 6
    assert [local_channel_groups(4, 3, r) for r in range(3)] == [(0, 2), (2, 1), (3, 1)]
    with pytest.raises(ValueError, match="at least 3 channel groups but there are 2"):
        local_channel_groups(2, 3, 0)
    # The advice names the group size that works: 4 channels over 3 ranks need groups of 1 (groups of 2 give 2)
    with pytest.raises(ValueError, match="aggregation_group_size to at most 1 for 4 channels"):
        local_channel_groups(2, 3, 0, num_channels=4)
    with pytest.raises(ValueError, match="aggregation_group_size to at most 6 for 7 channels"):
        local_channel_groups(1, 2, 0, num_channels=7)
    with pytest.raises(ValueError, match=r"1 channel\(s\) cannot fill 2 ranks"):
        local_channel_groups(1, 2, 0, num_channels=1)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        channel_group_sizes(4, 0)


def test_constructor_errors():
    with pytest.raises(ValueError, match="aggregation must be 'flat' or 'hierarchical'"):
        small(aggregation="tree")
    with pytest.raises(ValueError, match="partial aggregation must be 'cross_attention' or 'linear'"):
        small(partial_aggregation="mlp")
    with pytest.raises(ValueError, match="needs ClimaX\\(aggregation='hierarchical'\\)"):
        small(aggregation="flat").set_channel_parallel(None)


@pytest.mark.parametrize("partial", ["cross_attention", "linear"])
@pytest.mark.parametrize(("num_vars", "group_size"), [(7, 2), (5, 5), (6, 8), (4, 1)])
def test_hierarchical_forward_backward_and_rebuild(partial, num_vars, group_size):
    torch.manual_seed(0)
    model = small(num_vars, aggregation_group_size=group_size, partial_aggregation=partial)
    x = torch.randn(2, num_vars, 8, 12)
    out = model(x, torch.tensor([6.0, 12.0]), names(num_vars), names(num_vars)[:2])
    assert out.shape == (2, 2, 8, 12)
    out.square().mean().backward()
    assert model.token_embed.weight.grad[:num_vars].abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("var_agg."))
    rebuilt = ClimaX(**model.config)
    rebuilt.load_state_dict(model.state_dict())  # the configuration rebuilds the same architecture
    assert torch.equal(rebuilt(x, torch.tensor([6.0, 12.0]), names(num_vars), names(num_vars)[:2]), out.detach())
    assert {"var_agg.partial.query", "var_agg.final.query"} <= model.no_weight_decay() or partial == "linear"


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("recompute", "chunk_tokens"), [(False, None), (True, 5), (False, 7)])
def test_recomputation_and_token_chunks_are_exact(recompute, chunk_tokens):
    """Recomputing groups in backward and cutting tokens into slices change memory, not results."""
    torch.manual_seed(0)
    reference = small(7, aggregation_group_size=3, aggregation_chunk_tokens=None)
    reference.var_agg.recompute = False
    variant = copy.deepcopy(reference)
    variant.var_agg.recompute, variant.var_agg.chunk_tokens = recompute, chunk_tokens
    x, lead = torch.randn(2, 7, 8, 12), torch.tensor([6.0, 24.0])
    outs = []
    for model in (reference, variant):
        out = model(x, lead, names(7), names(7))
        out.square().mean().backward()
        outs.append((out.detach(), grads(model)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_token_local_so_sequence_parallel_can_shard_before_it():
    """The plan shards the patches before var_agg: aggregating a slice of tokens must give that slice of the whole."""
    torch.manual_seed(0)
    model = small(7, aggregation_group_size=2)
    patches = model.patchify(torch.randn(2, 7, 8, 12))  # [B, V, L, p*p], L = 24
    ids = model.variable_ids(names(7))
    whole = model.var_agg(patches, ids, model.tokenize)
    pieces = [model.var_agg(patches[:, :, a:b], ids, model.tokenize) for a, b in ((0, 9), (9, 17), (17, 24))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-6, atol=1e-6)


def saved_bytes(model: ClimaX, x: torch.Tensor) -> int:
    """Bytes autograd keeps from the embedding stage (tokenise + aggregate) until backward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    patches = model.patchify(x)
    ids = model.variable_ids(names(x.shape[1]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.embed(patches, ids, torch.zeros(x.shape[0]))
    return total


def test_hierarchical_keeps_group_aggregates_not_variable_tokens():
    """Flat keeps [B, V, L, D] tokens (and their key/value inputs); hierarchical keeps [B, G, L, D] partial
    aggregates, so for 24 variables in 3 groups autograd holds several times less."""
    x = torch.randn(1, 24, 16, 32)
    flat = saved_bytes(small(24, aggregation="flat", img_size=(16, 32)), x)
    hierarchical = saved_bytes(small(24, aggregation_group_size=8, img_size=(16, 32)), x)
    tokens = 24 * (16 // 2) * (32 // 2) * 32 * 4  # one [B, V, L, D] float32 tensor
    assert flat >= tokens
    assert hierarchical < 0.3 * flat, (hierarchical, flat)


def test_channel_parallel_plan_shards_after_the_aggregation():
    model = small(7)
    model.set_channel_parallel(object())  # the plan only asks whether a group is set
    plan = model.sequence_parallel_plan()
    assert plan["var_agg"] == "shard_output:1" and "patchify" not in plan
    model.set_channel_parallel(None)
    assert model.sequence_parallel_plan()["patchify"] == "shard_output:2"


# --- channel-parallel form on several processes ---


def channel_parallel_worker(num_vars: int, group_size: int, partial: str, steps: int = 3) -> dict:
    """Channel-parallel model on every rank against a deep copy run whole on this rank: outputs, gradients
    (averaged over the group, as data-parallel x sequence-parallel gradient reduction does) and SGD steps.

    SGD, not AdamW: the variable-aggregation queries start at zero and their first gradients are ~1e-12, which
    Adam's normalisation turns into full-size steps whose sign is decided by float rounding (the channel-parallel
    form sums the groups' gradients in another order), so Adam would compare rounding noise, not the method."""
    init_gloo()
    world = dist.get_world_size()
    torch.manual_seed(0)
    reference = small(num_vars, aggregation_group_size=group_size, partial_aggregation=partial, drop_rate=0.0)
    model = copy.deepcopy(reference)
    model.set_channel_parallel(dist.group.WORLD)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (reference, model)]
    errors = {"forward": 0.0, "grad": 0.0, "params": 0.0}
    counts = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)  # the same sample on every rank
        x = torch.randn(2, num_vars, 8, 12, generator=generator)
        target = torch.randn(2, num_vars, 8, 12, generator=generator)
        lead = torch.tensor([6.0, 24.0])
        for optimizer in optimizers:
            optimizer.zero_grad()
        expected = reference(x, lead, names(num_vars), names(num_vars))
        torch.nn.functional.mse_loss(expected, target).backward()
        with CollectiveCounter() as counter:
            out = model(x, lead, names(num_vars), names(num_vars))
            torch.nn.functional.mse_loss(out, target).backward()
        counts.append(dict(counter.counts()))
        for p in model.parameters():  # the gradient average of the data-parallel x sequence-parallel group
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        errors["forward"] = max(errors["forward"], relative_error(out.detach(), expected.detach()))
        for (_name, p), q in zip(model.named_parameters(), reference.parameters()):
            if q.grad is not None and q.grad.norm() > 0:
                errors["grad"] = max(errors["grad"], relative_error(p.grad, q.grad))
        for optimizer in optimizers:
            optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        errors["params"] = max(errors["params"], relative_error(p.detach(), q.detach()))
    local_groups = local_channel_groups(len(channel_group_sizes(num_vars, group_size)), world, dist.get_rank())[1]
    return {"errors": errors, "counts": counts, "local_groups": local_groups}


CHANNEL_CASES = [(2, 7, 2, "cross_attention"), (3, 7, 2, "linear"), (3, 11, 3, "cross_attention")]
# The other multi-process tests' workers, by world size: (key, target, kwargs).
OTHER_WORKERS = {
    3: [("sequence_parallel", "sequence_parallel_worker", {"num_vars": 7, "group_size": 2})],
    2: [("strategy", "strategy_worker", {"num_vars": 7, "group_size": 2})],
}


@pytest.fixture(scope="module")
def launches():
    """``launches(world)``: one launch of ``world`` processes running, in turn, channel_parallel_worker for each of
    CHANNEL_CASES of that world and then OTHER_WORKERS[world]; their per-rank results keyed by case or name."""
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            keys, calls = [], []
            for case in CHANNEL_CASES:
                if case[0] == world:
                    keys.append(case)
                    calls.append(("tests.weather.test_aggregation:channel_parallel_worker",
                                  {"num_vars": case[1], "group_size": case[2], "partial": case[3]}))
            for key, worker, kwargs in OTHER_WORKERS[world]:
                keys.append(key)
                calls.append((f"tests.weather.test_aggregation:{worker}", kwargs))
            cache[world] = dict(zip(keys, run_distributed_each(calls, world, timeout=900)))
        return cache[world]

    return get


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("world", "num_vars", "group_size", "partial"), CHANNEL_CASES)
def test_channel_parallel_equals_single_device(launches, world, num_vars, group_size, partial):
    results = launches(world)[(world, num_vars, group_size, partial)]
    groups = len(channel_group_sizes(num_vars, group_size))
    assert sum(r["local_groups"] for r in results) == groups  # every channel group aggregated exactly once
    for rank, result in enumerate(results):
        errors = result["errors"]
        assert errors["forward"] < 1e-6 and errors["grad"] < 1e-5 and errors["params"] < 1e-5, (rank, errors)
        for counts in result["counts"]:  # one all-gather forward, one reduce-scatter backward
            assert counts == {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}, counts


def sequence_parallel_worker(num_vars: int, group_size: int) -> dict:
    """Channel parallelism on the sequence-parallel group: the model's plan shards the tokens after var_agg, so each
    rank aggregates its variable groups of all tokens, then keeps its own tokens through the blocks."""
    from lightning_seqpar.parallelize import apply_sequence_parallel
    from lightning_seqpar.plan import SequenceParallelPlan

    init_gloo()
    world = dist.get_world_size()
    torch.manual_seed(0)
    reference = small(num_vars, aggregation_group_size=group_size, img_size=(10, 12))
    model = copy.deepcopy(reference)
    model.set_channel_parallel(dist.group.WORLD)
    applied = apply_sequence_parallel(model, SequenceParallelPlan(model.sequence_parallel_plan()), dist.group.WORLD)
    generator = torch.Generator().manual_seed(7)
    x, target = torch.randn(2, num_vars, 10, 12, generator=generator), torch.randn(2, 2, 10, 12, generator=generator)
    lead = torch.tensor([6.0, 24.0])
    expected = reference(x, lead, names(num_vars), names(num_vars)[:2])
    torch.nn.functional.mse_loss(expected, target).backward()
    out = model(x, lead, names(num_vars), names(num_vars)[:2])
    torch.nn.functional.mse_loss(out, target).backward()
    grad_error = 0.0
    for p, q in zip(model.parameters(), reference.parameters()):
        dist.all_reduce(p.grad)
        p.grad /= world
        if q.grad.norm() > 0:
            grad_error = max(grad_error, relative_error(p.grad, q.grad))
    applied.remove()
    return {"forward": relative_error(out.detach(), expected.detach()), "grad": grad_error}


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_channel_parallel_on_the_sequence_parallel_group(launches):
    """L = 30 tokens over 3 ranks and 7 variables in 4 groups (2, 1, 1 groups per rank), exact against one device."""
    for result in launches(3)["sequence_parallel"]:
        assert result["forward"] < 1e-6 and result["grad"] < 1e-5, result


STRATEGY_LAYOUTS = [  # (strategy arguments, the topology group whose ranks split the channels)
    ({"sequence_parallel_size": 2}, "sequence_group"),
    ({"tensor_parallel_size": 2}, "tensor_group"),
    ({"tensor_parallel_size": 2, "fsdp": True}, "tensor_group"),
]


def strategy_worker(num_vars: int, group_size: int, steps: int = 3) -> list[dict]:
    """Channel parallelism enabled the documented way, in configure_model with one of the strategy's groups, trained
    under SeqParStrategy(...) for every layout of ``STRATEGY_LAYOUTS``, against the same model trained alone on the
    same batches."""
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_seqpar import SeqParStrategy

    class Module(LightningModule):
        def __init__(self, group: str) -> None:
            super().__init__()
            self.model = small(num_vars, aggregation_group_size=group_size, img_size=(10, 12))
            self.group, self.seen = group, []

        def configure_model(self) -> None:
            self.model.set_channel_parallel(getattr(self.trainer.strategy.topology, self.group))

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            self.seen.append(index.tolist())
            self.plan = str(self.trainer.strategy.applied_plan.plan)  # the plan is removed again at teardown
            out = self.model(x, torch.full((x.shape[0],), 24.0), names(num_vars), names(num_vars))
            return torch.nn.functional.mse_loss(out, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    generator = torch.Generator().manual_seed(3)
    data = TensorDataset(
        torch.randn(8, num_vars, 10, 12, generator=generator),
        torch.randn(8, num_vars, 10, 12, generator=generator),
        torch.arange(8),
    )
    results = []
    for kwargs, group in STRATEGY_LAYOUTS:
        seed_everything(0)
        module = Module(group)
        reference = copy.deepcopy(module.model)
        trainer = Trainer(accelerator="cpu", devices=2, strategy=SeqParStrategy(timeout=300, **kwargs),
                          max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        trainer.fit(module, DataLoader(data, batch_size=2))
        final = {k.removeprefix("model."): v for k, v in trainer.strategy.full_state_dict().items()}
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
        for indices in module.seen:
            optimizer.zero_grad()
            x, y, _ = data[indices]
            out = reference(x, torch.full((len(indices),), 24.0), names(num_vars), names(num_vars))
            torch.nn.functional.mse_loss(out, y).backward()
            optimizer.step()
        errors = {name: relative_error(final[name], p.detach()) for name, p in reference.named_parameters()}
        worst = max(errors, key=errors.get)
        results.append({"layout": kwargs, "error": errors[worst], "worst": worst, "plan": module.plan,
                        "steps": len(module.seen)})
    return results


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_channel_parallel_under_the_strategy(launches):
    """7 variables in groups of 2 split over the 2 ranks of the SP group (shard after var_agg), of the tensor-parallel
    group (DDP engine), and of the tensor-parallel group under FSDP2; 3 SGD steps each, every parameter within 1e-5
    of one device. (On the tp group the channels' gradients were once left unsummed: training diverged silently.)"""
    for per_rank in launches(2)["strategy"]:
        for result in per_rank:
            assert result["steps"] == 3, result
            if "sequence_parallel_size" in result["layout"]:
                assert "var_agg" in result["plan"] and "patchify" not in result["plan"], result["plan"]
            assert result["error"] < 1e-5, result
