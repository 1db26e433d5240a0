"""The registry of distributed attention kinds, the public region of the sequence-parallel runtime, and the
layering of the package (no process group beyond a one-rank gloo group)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from lightning_seqpar import PlanError, SeqParStrategy, apply_sequence_parallel, infer_plan
from lightning_seqpar.attention import (
    BACKENDS,
    AttentionKind,
    UnknownAttentionKindError,
    attention_kind_names,
    check_attention_choice,
    get_attention_kind,
    lss_attention,
    register_attention_kind,
    unregister_attention_kind,
)
from lightning_seqpar.attention.registry import markdown_table
from lightning_seqpar.comm import SequenceLayout
from lightning_seqpar.parallelize import ROLE_ORDER, NoDistributedAttentionError, SequenceParallelRuntime
from lightning_seqpar.plan import ROLE_KINDS
from tests.models import TinyViT

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_seqpar"
DOCS = Path(__file__).resolve().parents[1] / "docs"


# --- the registry ----------------------------------------------------------------------------------------


def test_builtin_kinds_in_order():
    assert attention_kind_names() == ("ulysses", "lss", "ring", "hybrid")


def test_unknown_kind_names_the_registered_ones(group):
    listed = "ulysses, lss, ring, hybrid"
    with pytest.raises(
        UnknownAttentionKindError,
        match=f"unknown sequence-parallel attention 'star'; the registered kinds are {listed}",
    ):
        get_attention_kind("star")
    with pytest.raises(
        PlanError, match=f"unknown sequence-parallel attention 'star'; the registered kinds are {listed}"
    ):
        apply_sequence_parallel(TinyViT(), infer_plan(TinyViT()), group, attention="star")
    with pytest.raises(ValueError, match="attention must be 'auto', 'ulysses', 'lss', 'ring' or 'hybrid', got 'star'"):
        SeqParStrategy(attention="star")


# (heads, P, u) that each kind refuses, with the message; None: the kind has no head limit.
REFUSED = {
    "ulysses": [((3, 4, None), "3 heads cannot give each of 4 ranks at least one")],
    "lss": None,
    "ring": None,
    "hybrid": [
        ((1, 4, 2), "splits the 1 heads over a Ulysses group of 2 ranks"),
        ((8, 4, 3), "needs a Ulysses degree u that divides sequence_parallel_size=4"),
        ((8, 4, None), "got ulysses_degree=None"),
    ],
}


@pytest.mark.parametrize("name", attention_kind_names())
def test_each_kind_checks_its_heads(name):
    assert name in REFUSED, f"add the head/group combinations the new kind {name!r} refuses to REFUSED"
    kind = get_attention_kind(name)
    if REFUSED[name] is None:
        assert kind.fits(1, 64, 2) and kind.fits(3, 4)
        return
    for (heads, sp, degree), message in REFUSED[name]:
        with pytest.raises(ValueError, match=re.escape(message)):
            kind.check_heads(heads, sp, degree)
        assert not kind.fits(heads, sp, degree)
    assert kind.fits(8, 4, 2)


def test_ring_kinds_refuse_kernels_without_log_sum_exp(group):
    for name in ("ring", "hybrid"):
        with pytest.raises(
            ValueError,
            match=f"attention='{name}' runs its own block kernels; attention_backend must be one of auto, math",
        ):
            check_attention_choice(name, "sdpa_efficient")
    with pytest.raises(PlanError, match="attention='ring' runs its own block kernels"):
        apply_sequence_parallel(TinyViT(), infer_plan(TinyViT()), group, attention="ring", backend="sdpa")
    with pytest.raises(PlanError, match="attention='hybrid' needs hybrid_groups"):
        apply_sequence_parallel(TinyViT(), infer_plan(TinyViT()), group, attention="hybrid", backend="math")


def test_registration_is_checked():
    kind = get_attention_kind("lss")
    with pytest.raises(ValueError, match="'auto' is not a kind"):
        register_attention_kind(AttentionKind("auto", kind.function, BACKENDS, "d", "0"))
    with pytest.raises(ValueError, match="'lss' is already registered; pass replace=True"):
        register_attention_kind(kind)
    with pytest.raises(ValueError, match=r"unknown local kernels \['xformers'\]"):
        register_attention_kind(AttentionKind("mine", kind.function, ("xformers",), "d", "0"))
    with pytest.raises(UnknownAttentionKindError, match="unknown sequence-parallel attention 'mine'"):
        unregister_attention_kind("mine")


@pytest.fixture
def counted_kind():
    """A user kind: LSS under another name, counting its calls and the groups it was given."""
    calls = []

    def my_lss(q, k, v, groups, **options):
        calls.append((groups.sequence, options["backend"], options["sequence_lengths"]))
        return lss_attention(q, k, v, groups.sequence, **options)

    register_attention_kind(AttentionKind("my_lss", my_lss, ("auto", "math"), "LSS, counted", "2311.02382"))
    yield calls
    unregister_attention_kind("my_lss")


def test_user_kind_is_read_by_strategy_and_plan(group, counted_kind):
    strategy = SeqParStrategy(attention="my_lss", attention_backend="math")
    assert strategy.attention == "my_lss"
    with pytest.raises(
        ValueError,
        match="attention='my_lss' runs on a subset of the local kernels; attention_backend must be one of auto, math,"
              " got 'sdpa'",
    ):
        SeqParStrategy(attention="my_lss", attention_backend="sdpa")
    with pytest.raises(
        ValueError, match="attention must be 'auto', 'ulysses', 'lss', 'ring', 'hybrid' or 'my_lss', got 'star'"
    ):
        SeqParStrategy(attention="star")
    torch.manual_seed(0)
    model, x = TinyViT(), torch.randn(2, 13, 6)
    expected = model(x)
    applied = apply_sequence_parallel(model, infer_plan(model), group, attention="my_lss", backend="math")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    applied.remove()
    assert [(g, b, lengths) for g, b, lengths in counted_kind] == [(group, "math", (13,))] * 2  # one call per block


def test_docs_table_is_the_registry():
    text = (DOCS / "choosing-attention.md").read_text()
    assert markdown_table() in text, (
        "docs/choosing-attention.md: paste lightning_seqpar.attention.registry.markdown_table()"
    )
    documented = re.findall(r"^\| `([a-z_]+)` \|", text.split(markdown_table().splitlines()[0])[1], flags=re.M)
    assert tuple(documented[: len(attention_kind_names())]) == attention_kind_names()


# --- the runtime's region ----------------------------------------------------------------------------------


def test_runtime_region_enter_exit(group):
    runtime = SequenceParallelRuntime(group, "lss", "math")
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(NoDistributedAttentionError, match="ran outside the sequence-parallel region"):
        runtime.attend(q, q, q)
    with pytest.raises(ValueError, match=r"over 1 ranks cannot enter with a layout of 2 shards \[2, 3\]"):
        runtime.enter(SequenceLayout((2, 3)))
    assert not runtime.active
    runtime.enter(SequenceLayout((5,)))
    assert runtime.active and runtime.layout == SequenceLayout((5,)) and runtime.token_lengths() == (5, 5)
    runtime.attend(q, q, q)
    assert runtime.attention_calls == 1
    runtime.exit()
    assert not runtime.active and runtime.token_lengths() is None
    runtime.exit()  # idempotent
    with pytest.raises(RuntimeError, match="boom"), runtime.region(SequenceLayout((5,))):
        assert runtime.active and runtime.attention_calls == 0  # a new region counts from zero
        raise RuntimeError("boom")
    assert not runtime.active  # left on the exception
    with pytest.raises(AttributeError):
        runtime.active = True  # read-only: only enter/exit change the region


def test_runtime_region_keeps_the_outer_random_stream(group):
    runtime = SequenceParallelRuntime(group, "ulysses", "math")
    torch.manual_seed(3)
    plain = torch.rand(4)
    torch.manual_seed(3)
    with runtime.region(SequenceLayout((5,))):
        inside = torch.rand(4)
    after = torch.rand(4)
    assert torch.equal(after, plain)  # the region takes nothing from the stream the ranks share outside it
    assert not torch.equal(inside, plain)  # it draws from a stream of its own


def test_every_plan_role_applies_itself_once():
    covered = [kind for application in ROLE_ORDER for kind in application.kinds]
    assert sorted(covered) == sorted(ROLE_KINDS)


# --- layering ----------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_import_graph_points_down():
    above_attention = (
        "lightning_seqpar.plan",
        "lightning_seqpar.parallelize",
        "lightning_seqpar.strategy",
        "lightning_seqpar.pipeline",
    )
    for path in (PACKAGE / "attention").glob("*.py"):
        bad = sorted(n for n in _imports(path) if n.startswith(above_attention))
        assert not bad, f"{path.name} imports {bad}: the attention layer sits below the plan and the strategy"
    for path in PACKAGE.rglob("*.py"):
        if "weather" in path.relative_to(PACKAGE).parts:
            continue
        bad = sorted(
            n for n in _imports(path) if n.startswith("lightning_seqpar.weather") or n == "lightning_seqpar.weather"
        )
        assert not bad, f"{path.relative_to(PACKAGE)} imports the weather application: {bad}"
