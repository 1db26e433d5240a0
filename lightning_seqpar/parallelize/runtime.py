"""The state of one applied plan while a forward runs: the sequence-parallel region, its token layout, its attention.

The region is entered where the plan shards the tokens (or where a pipeline stage receives a shard) and left where
they are gathered (or where the stage sends them on): :meth:`SequenceParallelRuntime.enter` /
:meth:`SequenceParallelRuntime.exit`, or :meth:`SequenceParallelRuntime.region` as a context manager. Inside it
every distributed attention call runs the plan's attention kind (:mod:`lightning_seqpar.attention.registry`) on
``[B, L_r, H, d]`` q, k, v with the region's layout.

Letters: B batch, L tokens, L_r this rank's tokens, H heads, d head dim, P sequence-parallel ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_seqpar.adapters import disable_mha_fastpath
from lightning_seqpar.attention import AttentionBackend
from lightning_seqpar.attention.registry import AttentionGroups, AttentionKind, get_attention_kind
from lightning_seqpar.comm import (
    SequenceLayout,
    all_gather_sequence,
    gather_sequence,
    group_rank,
    group_size,
    shard_sequence,
)
from lightning_seqpar.topology import ParallelDims


class NoDistributedAttentionError(RuntimeError):
    """Raised when the sequence-parallel region ran without any attention being made distributed."""


def _in_backward() -> bool:
    """Inside autograd's backward, i.e. an activation-checkpoint recomputation of a block of the region."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class SequenceParallelRuntime:
    """State shared by the hooks of one applied plan: the groups, the attention kind, and the current region.

    Attributes:
        group: The sequence-parallel process group (P ranks, rank order = token order).
        attention: The distributed attention kind, a name registered in :mod:`lightning_seqpar.attention.registry`.
        backend: The local kernel the kind runs on (``attention_backend``).
        hybrid_groups: ``(ulysses_group, ring_group)`` for kinds on Ulysses x ring sub-groups (``"hybrid"``).
        check_layout: Called with the whole token layout at the shard point, before any rank keeps its shard (the
            strategy checks there that tensor parallelism leaves every ``tp`` rank of every ``sp`` rank tokens).
        dropout_fallback: Run calls with attention dropout as LSS where the kind has no dropout (set when
            ``attention="auto"`` chose the kind, never for an explicit choice).

    Raises:
        UnknownAttentionKindError: ``attention`` is not a registered kind.
    """

    group: ProcessGroup
    attention: str = "ulysses"
    backend: AttentionBackend = "auto"
    hybrid_groups: tuple[ProcessGroup, ProcessGroup] | None = None
    dropout_fallback: bool = False
    check_layout: Callable[[SequenceLayout], None] | None = None
    _layout: SequenceLayout | None = field(default=None, init=False, repr=False)
    _attention_calls: int = field(default=0, init=False, repr=False)
    _active: bool = field(default=False, init=False, repr=False)
    _restore_fastpath: Callable[[], None] | None = field(default=None, init=False, repr=False)
    _outer_rng: tuple[Tensor, Tensor | None] | None = field(default=None, init=False, repr=False)
    _rng_device: torch.device | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.kind: AttentionKind = get_attention_kind(self.attention)
        ulysses, ring = self.hybrid_groups if self.hybrid_groups is not None else (None, None)
        self.groups = AttentionGroups(self.group, ulysses, ring)

    # --- the region ---------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether a forward is inside the sequence-parallel region (between :meth:`enter` and :meth:`exit`)."""
        return self._active

    @property
    def layout(self) -> SequenceLayout | None:
        """How the tokens of the current (or last) region are split over the P ranks."""
        return self._layout

    @property
    def attention_calls(self) -> int:
        """Distributed attention calls since the region was entered (recomputations in backward included)."""
        return self._attention_calls

    def enter(self, layout: SequenceLayout, device: torch.device | str = "cpu") -> None:
        """Start the sequence-parallel region of one forward, whose tokens are split as ``layout`` says.

        Args:
            layout: The token count of every rank of the group, in rank order.
            device: Where the region's tensors are (a CUDA device also gets a random stream of this rank's own).

        Counts attention calls from zero, gives the region a random stream of this rank's own (see
        :meth:`_fork_rng`) and turns off torch's fused multi-head-attention inference path (it bypasses the
        module forwards the plan intercepts). Called by the shard point, and by a pipeline stage that receives
        token shards ``[B, L_r, D]`` from the previous stage.

        Raises:
            ValueError: ``layout`` does not have one length per rank of the group.
        """
        if len(layout.lengths) != group_size(self.group):
            raise ValueError(
                f"a sequence-parallel region over {group_size(self.group)} ranks cannot enter with a layout of"
                f" {len(layout.lengths)} shards {list(layout.lengths)}."
            )
        self._layout = layout
        self._attention_calls = 0
        self._active = True
        self._fork_rng(torch.device(device))
        if self._restore_fastpath is None:
            self._restore_fastpath = disable_mha_fastpath()

    def exit(self) -> None:
        """End the region: the random stream shared by the group and torch's fast path come back. Idempotent."""
        self._active = False
        self._restore_rng()
        if self._restore_fastpath is not None:
            self._restore_fastpath()
            self._restore_fastpath = None

    end_region = exit  # the name of the first release

    @contextlib.contextmanager
    def region(self, layout: SequenceLayout) -> Iterator[SequenceParallelRuntime]:
        """``with runtime.region(layout): ...`` runs the body inside the region (:meth:`enter`, then :meth:`exit`)."""
        self.enter(layout)
        try:
            yield self
        finally:
            self.exit()

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """The shard point: enter the region with an even split of ``x``'s ``dim`` and keep this rank's tokens,
        ``[.., L, ..] -> [.., L_r, ..]`` (all-gather in backward).

        Raises:
            TopologyError: The sequence has fewer tokens than the group has ranks.
        """
        world = group_size(self.group)
        dim = dim % x.dim()
        ParallelDims(world_size=world, sequence_parallel_size=world).check_sequence_length(x.shape[dim])
        layout = SequenceLayout.even(x.shape[dim], world)
        if self.check_layout is not None:  # the same whole layout on every rank: all refuse it alike, none waits
            self.check_layout(layout)
        self.enter(layout, x.device)
        return shard_sequence(x, self.group, dim, self._layout)

    def gather(self, x: Tensor, dim: int) -> Tensor:
        """The gather point: leave the region and all-gather the tokens of ``x``, ``[.., L_r, ..] -> [.., L, ..]``.

        Raises:
            NoDistributedAttentionError: No attention ran distributed inside the region.
        """
        if self._attention_calls == 0:
            raise NoDistributedAttentionError(
                "the sequence-parallel region ran but no attention in it was made distributed, so every rank"
                " attended only to its own tokens. No scaled_dot_product_attention call and no batched"
                " (Q K^T, P V) matmul pair ran inside a module marked 'attention'/'sdpa' (e.g. attention written"
                " with einsum, an attention module the plan does not mark, or windowed attention over groups of"
                " tokens that are not the sharded sequence, as in Swin, which cannot be sequence-parallel): register a"
                " forward with"
                " lightning_seqpar.register_attention(cls, forward), mark the module that attends 'attention', or"
                " pass an explicit plan."
            )
        self.exit()
        return gather_sequence(x, self.group, dim % x.dim(), self._layout)

    # --- attention inside the region ---------------------------------------------------------------------

    @torch.compiler.disable
    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, dropout_p: float = 0.0,
        softmax_scale: float | None = None,
    ) -> Tensor:
        """Distributed attention on ``[B, L_r, H, d]`` q, k, v with this plan's kind and the region's layout.

        Never traced by ``torch.compile``: a compiled block breaks its graph here and calls this eagerly, so the
        collectives run on the process group exactly as in an uncompiled model.

        Raises:
            NoDistributedAttentionError: Called outside the region (and outside a recomputation in backward).
        """
        self._check_in_region()
        self._attention_calls += 1
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):
            # What SDPA does under autocast (it is on autocast's lower-precision list): q, k and v in the autocast
            # dtype, also when a q/k normalisation left them in float32 next to a bf16 v. Casting before the
            # collectives also halves the bytes they move.
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        layout = self._layout
        lengths = (
            layout.lengths if layout is not None and layout.lengths[group_rank(self.group)] == q.shape[1] else None
        )
        kind = self.kind
        if self.dropout_fallback and dropout_p > 0.0 and not kind.supports_dropout:
            # attention="auto" chose a kind without dropout; LSS has it, and no head limit
            kind = get_attention_kind("lss")
        return kind.attend(
            q, k, v, self.groups, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, backend=self.backend,
            sequence_lengths=lengths,
        )

    def token_lengths(self) -> tuple[int, int] | None:
        """``(L_r, L)``: this rank's and the whole sequence's token counts in the current region, or None outside."""
        if self._layout is None or not (self._active or _in_backward()):
            return None
        return self._layout.lengths[group_rank(self.group)], self._layout.total

    def token_offset(self) -> int:
        """Index in the whole sequence of this rank's first token in the current (or last) region."""
        assert self._layout is not None
        return self._layout.offset(group_rank(self.group))

    @torch.compiler.disable
    def gather_tokens(self, x: Tensor, dim: int, *, count: bool) -> Tensor:
        """All-gather this rank's tokens of ``x`` along ``dim`` (``[.., L_r, ..] -> [.., L, ..]``, reduce-scatter in
        backward); ``count`` records one distributed attention call (the keys of a hand-written ``Q K^T``)."""
        self._check_in_region()
        if count:
            self._attention_calls += 1
        return all_gather_sequence(x.contiguous(), self.group, dim % x.dim(), self._layout)

    def _check_in_region(self) -> None:
        if not self._active and not _in_backward():
            raise NoDistributedAttentionError(
                "a distributed attention ran outside the sequence-parallel region (no shard point ran before it),"
                " so its tokens were never split: the plan's shard_input/shard_output module is not called on the"
                " way to this attention. Put the shard point on a module that runs before it."
            )

    # --- random streams ----------------------------------------------------------------------------------

    def _fork_rng(self, device: torch.device) -> None:
        """Give the region a random stream of this rank's own, and keep the one outside the region untouched.

        Outside the region every rank of the group computes the same thing on the same sample and must draw the
        same numbers (ViTMAE's random masking, drop-path masks of a whole sample); inside, each rank holds other
        tokens, and a shared stream would give every token shard the same dropout pattern. The outer state is
        restored at the exit, so the draws outside the region are those of single-device training.
        """
        self._restore_rng()  # a region left by an exception: back to the stream all ranks share
        cuda = device.type == "cuda"
        outer = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
        seed = int(torch.randint(0, 2**62, (1,)).item()) + 1_000_003 * group_rank(self.group)
        torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        self._outer_rng, self._rng_device = outer, device

    def _restore_rng(self) -> None:
        if self._outer_rng is None:
            return
        cpu, cuda = self._outer_rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self._rng_device)
        self._outer_rng = None
