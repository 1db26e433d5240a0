"""One registry of the distributed attention kinds: for each name, how it runs, what it checks, which local kernels it
takes.

Two words kept apart throughout the package:

- an **attention kind** (a *distributed attention*: ``ulysses``, ``lss``, ``ring``, ``hybrid``) decides how the
  tokens that P ranks hold meet in attention, with which collectives (``SeqParStrategy(attention=...)``);
- a **local kernel** (a *backend*: flash-attn, torch SDPA and its cuDNN / flash / efficient kernels, math) computes
  attention on the tensors one rank holds (``SeqParStrategy(attention_backend=...)``, :data:`~.local.BACKENDS`).

Everything that needs the list of kinds reads it here: the strategy's argument checks, the plan's runtime
(:meth:`AttentionKind.attend`), ``attention="auto"`` (:func:`choose_attention`) and the table in
docs/choosing-attention.md (:func:`markdown_table`, checked by a test). :func:`register_attention_kind` adds one.

Letters: B batch, L_r this rank's tokens, H heads, d head dim, P sequence-parallel ranks, u Ulysses degree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_seqpar.attention.hybrid import check_hybrid_heads, hybrid_attention
from lightning_seqpar.attention.local import BACKENDS
from lightning_seqpar.attention.lss import lss_attention
from lightning_seqpar.attention.ring import RING_BACKENDS, ring_attention
from lightning_seqpar.attention.ulysses import check_ulysses_heads, ulysses_attention

AUTO = "auto"
"""Not a kind: ``attention="auto"`` chooses one of the registered kinds from the model's head counts."""


class UnknownAttentionKindError(ValueError):
    """Raised for an attention kind that is not registered; the message lists the registered ones."""


@dataclass(frozen=True)
class AttentionGroups:
    """The process groups a distributed attention runs on.

    Attributes:
        sequence: The sequence-parallel group (P ranks, rank order = token order).
        ulysses: For kinds with ``uses_ulysses_degree``: this rank's Ulysses group (u consecutive SP ranks).
        ring: For kinds with ``uses_ulysses_degree``: this rank's ring group (P / u ranks).
    """

    sequence: ProcessGroup
    ulysses: ProcessGroup | None = None
    ring: ProcessGroup | None = None


def _no_head_limit(num_heads: int, sequence_parallel_size: int, ulysses_degree: int | None) -> None:
    return None


@dataclass(frozen=True)
class AttentionKind:
    """One distributed attention kind.

    Attributes:
        name: What users pass as ``attention=``.
        function: ``fn(q, k, v, groups, *, dropout_p, softmax_scale, causal, backend, sequence_lengths)``: this
            rank's ``[B, L_r, H, d]`` queries, keys and values and an :class:`AttentionGroups` -> ``[B, L_r, H, d]``.
        check_heads: ``fn(num_heads, sequence_parallel_size, ulysses_degree)`` raising ``ValueError`` (with what to
            do) when H heads cannot run on P ranks; the same rule the kind's function applies at run time.
        backends: The local kernels (``attention_backend`` values) it can run on.
        description: One line for the docs table.
        paper: The paper it follows (arXiv id).
        head_limit: The head rule in words, for the docs table.
        supports_dropout: Whether attention dropout is implemented (``attention="auto"`` runs calls with dropout as
            LSS where the chosen kind has none).
        uses_ulysses_degree: It runs on Ulysses x ring sub-groups (``ulysses_degree``, ``AttentionGroups.ulysses``).
        backend_note: Why ``backends`` is restricted, for the error message.
    """

    name: str
    function: Callable[..., Tensor]
    backends: tuple[str, ...]
    description: str
    paper: str
    head_limit: str = "none"
    check_heads: Callable[[int, int, int | None], None] = _no_head_limit
    supports_dropout: bool = True
    uses_ulysses_degree: bool = False
    backend_note: str = "runs on a subset of the local kernels"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, groups: AttentionGroups, **options) -> Tensor:
        """Run this kind on ``[B, L_r, H, d]`` q, k, v over ``groups``; ``options`` go to :attr:`function`.

        Raises:
            ValueError: ``groups`` lack the sub-groups this kind needs.
        """
        if self.uses_ulysses_degree and (groups.ulysses is None or groups.ring is None):
            raise ValueError(
                f"attention={self.name!r} runs on Ulysses x ring sub-groups, but none were given: pass"
                " hybrid_groups=(ulysses_group, ring_group) from build_hybrid_groups."
            )
        return self.function(q, k, v, groups, **options)

    def check_backend(self, backend: str, owner: str = "") -> None:
        """Raise ``ValueError`` unless the local kernel ``backend`` is one this kind runs on."""
        if backend not in self.backends:
            raise ValueError(
                f"{_prefix(owner)}attention={self.name!r} {self.backend_note}; attention_backend must be one of"
                f" {', '.join(self.backends)}, got {backend!r}."
            )

    def fits(self, num_heads: int, sequence_parallel_size: int, ulysses_degree: int | None = None) -> bool:
        """Whether :attr:`check_heads` accepts H heads on P ranks (with Ulysses degree u where the kind uses one)."""
        try:
            self.check_heads(num_heads, sequence_parallel_size, ulysses_degree)
        except ValueError:
            return False
        return True


def _prefix(owner: str) -> str:
    return f"{owner}: " if owner else ""


# --- the registered kinds ---------------------------------------------------------------------------------


def _ulysses(q, k, v, groups: AttentionGroups, **options) -> Tensor:
    return ulysses_attention(q, k, v, groups.sequence, **options)


def _lss(q, k, v, groups: AttentionGroups, **options) -> Tensor:
    return lss_attention(q, k, v, groups.sequence, **options)


def _ring(q, k, v, groups: AttentionGroups, **options) -> Tensor:
    return ring_attention(q, k, v, groups.sequence, **options)


def _hybrid(q, k, v, groups: AttentionGroups, **options) -> Tensor:
    return hybrid_attention(q, k, v, groups.ulysses, groups.ring, **options)


def _ulysses_heads(num_heads: int, sequence_parallel_size: int, ulysses_degree: int | None) -> None:
    check_ulysses_heads(num_heads, sequence_parallel_size)


def _hybrid_heads(num_heads: int, sequence_parallel_size: int, ulysses_degree: int | None) -> None:
    if ulysses_degree is None or ulysses_degree < 1 or sequence_parallel_size % ulysses_degree:
        raise ValueError(
            f"hybrid attention needs a Ulysses degree u that divides sequence_parallel_size={sequence_parallel_size}"
            f" (u x ring degree = P), got ulysses_degree={ulysses_degree!r}."
        )
    check_hybrid_heads(num_heads, ulysses_degree)


_RING_NOTE = "runs its own block kernels"

_KINDS: dict[str, AttentionKind] = {}


def register_attention_kind(kind: AttentionKind, *, replace: bool = False) -> None:
    """Add a distributed attention kind; from then on ``SeqParStrategy(attention=kind.name)`` and
    :func:`~lightning_seqpar.parallelize.apply_sequence_parallel` accept it.

    Raises:
        ValueError: The name is ``"auto"`` or already registered (pass ``replace=True`` to swap it), or a backend
            in ``kind.backends`` is not a local kernel of :data:`~lightning_seqpar.attention.local.BACKENDS`.
    """
    if kind.name == AUTO:
        raise ValueError(
            "'auto' is not a kind: it is the strategy's choice among the registered kinds; pick another name."
        )
    if kind.name in _KINDS and not replace:
        raise ValueError(f"attention kind {kind.name!r} is already registered; pass replace=True to swap it.")
    unknown = [b for b in kind.backends if b not in BACKENDS]
    if unknown:
        raise ValueError(
            f"attention kind {kind.name!r} lists unknown local kernels {unknown}; they are {', '.join(BACKENDS)}."
        )
    _KINDS[kind.name] = kind


def unregister_attention_kind(name: str) -> None:
    """Remove a kind added with :func:`register_attention_kind` (raises :class:`UnknownAttentionKindError` if
    absent)."""
    get_attention_kind(name)
    del _KINDS[name]


def attention_kind_names() -> tuple[str, ...]:
    """The registered kinds, in registration order (``"auto"`` is not one of them)."""
    return tuple(_KINDS)


def get_attention_kind(name: str) -> AttentionKind:
    """The registered kind ``name``.

    Raises:
        UnknownAttentionKindError: ``name`` is not registered; the message names the registered kinds.
    """
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise UnknownAttentionKindError(
            f"unknown sequence-parallel attention {name!r}; the registered kinds are {', '.join(_KINDS)}"
            " (lightning_seqpar.attention.register_attention_kind adds one)."
        ) from None


def check_attention_choice(attention: str, backend: str, ulysses_degree: int | None = None, owner: str = "") -> None:
    """Check a user's ``attention`` / ``attention_backend`` / ``ulysses_degree`` before anything runs.

    Args:
        attention: ``"auto"`` or a registered kind.
        backend: A local kernel of :data:`~lightning_seqpar.attention.local.BACKENDS` the kind runs on.
        ulysses_degree: Only for kinds with ``uses_ulysses_degree``: a positive integer.
        owner: Prefix of the error messages (e.g. ``"SeqParStrategy"``).

    Raises:
        ValueError: Any of the three is not valid; the message lists the valid values.
    """
    names = [AUTO, *_KINDS]
    if not isinstance(attention, str) or (attention != AUTO and attention not in _KINDS):
        listed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise ValueError(f"{_prefix(owner)}attention must be {listed}, got {attention!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"{_prefix(owner)}attention_backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    kind = _KINDS.get(attention)
    if kind is not None:
        kind.check_backend(backend, owner)
    if ulysses_degree is not None and (
        kind is None or not kind.uses_ulysses_degree or isinstance(ulysses_degree, bool)
        or not isinstance(ulysses_degree, int) or ulysses_degree < 1
    ):
        takers = " or ".join(f"attention={k.name!r}" for k in _KINDS.values() if k.uses_ulysses_degree)
        raise ValueError(
            f"{_prefix(owner)}ulysses_degree={ulysses_degree!r} is only for {takers} and must be a positive integer."
        )


def choose_attention(
    heads: Sequence[int], sequence_parallel_size: int, backend: str = "auto"
) -> tuple[str, int | None, str]:
    """``attention="auto"``: ``(kind, ulysses_degree, reason)`` for a model with these head counts.

    Ulysses (DeepSpeed-Ulysses, arXiv 2309.14509) when every attention has at least ``sequence_parallel_size``
    heads; otherwise hybrid Ulysses x ring (USP, arXiv 2405.07719) with the largest Ulysses degree that divides
    ``sequence_parallel_size`` and is at most the fewest heads (ring alone when that is 1); LSS (arXiv 2311.02382,
    no head limit) when the local kernel cannot run a ring or no head count is known. Each candidate is asked
    through its registry entry (:meth:`AttentionKind.fits`, :attr:`AttentionKind.backends`).

    Args:
        heads: The head count of every attention the plan makes distributed (may be empty: unknown).
        sequence_parallel_size: P.
        backend: The local kernel (``attention_backend``).
    """
    sp = sequence_parallel_size
    ulysses, ring, hybrid = (get_attention_kind(n) for n in ("ulysses", "ring", "hybrid"))
    if sp == 1:
        return ulysses.name, None, "one rank per sequence: no communication"
    if not heads:
        return "lss", None, (
            "no head count found on the attention modules (attributes num_heads / num_attention_heads / heads);"
            " LSS has no head limit"
        )
    fewest = min(heads)
    if ulysses.fits(fewest, sp):
        return ulysses.name, None, f"every attention has >= {sp} heads (fewest: {fewest}), one all-to-all each way"
    if backend not in ring.backends:
        return "lss", None, (
            f"{fewest} heads < sequence_parallel_size={sp} rules out Ulysses, and attention_backend={backend!r}"
            " cannot run a ring; LSS has no head limit"
        )
    degree = max(d for d in range(1, min(fewest, sp) + 1) if hybrid.fits(fewest, sp, d))
    if degree == 1:
        return ring.name, None, f"{fewest} head(s) < sequence_parallel_size={sp} and no Ulysses degree > 1 divides {sp}"
    return hybrid.name, degree, (
        f"{fewest} heads < sequence_parallel_size={sp}: Ulysses inside groups of {degree} ranks, ring across"
        f" {sp // degree} groups"
    )


def markdown_table() -> str:
    """The registered kinds as a markdown table (docs/choosing-attention.md holds it; a test keeps them equal)."""
    rows = ["| kind | what it does | paper | head limit | dropout | local kernels |", "|---|---|---|---|---|---|"]
    for k in _KINDS.values():
        backends = ", ".join(f"`{b}`" for b in k.backends)
        rows.append(
            f"| `{k.name}` | {k.description} | arXiv {k.paper} | {k.head_limit} |"
            f" {'yes' if k.supports_dropout else 'no'} | {backends} |"
        )
    return "\n".join(rows)


for _kind in (
    AttentionKind(
        "ulysses", _ulysses, BACKENDS, paper="2309.14509", head_limit="`H >= P`", check_heads=_ulysses_heads,
        description="one all-to-all trades token shards for head shards,"
        " the local kernel sees all L tokens of H/P heads",
    ),
    AttentionKind(
        "lss", _lss, BACKENDS, paper="2311.02382",
        description="keeps its queries, gathers the keys and values of all L tokens in one all-gather",
    ),
    AttentionKind(
        "ring", _ring, RING_BACKENDS, paper="2310.01889", supports_dropout=False, backend_note=_RING_NOTE,
        description="keeps its queries, key/value blocks travel around the ring in P-1 overlapped exchanges",
    ),
    AttentionKind(
        "hybrid", _hybrid, RING_BACKENDS, paper="2405.07719", head_limit="`H >= u`", check_heads=_hybrid_heads,
        supports_dropout=False, uses_ulysses_degree=True, backend_note=_RING_NOTE,
        description="Ulysses inside groups of u ranks, ring across the P/u groups",
    ),
):
    register_attention_kind(_kind)
