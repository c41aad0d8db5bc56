"""Small typed records that cross the scheduler -> worker -> scheduler boundary.

They ride on vLLM's own messages as extra attributes (``SchedulerOutput.mc_step`` and
``ModelRunnerOutput.mc_results``), so they must stay plain, picklable and small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NodeId = tuple[int, int]


@dataclass
class MCRequestPlan:
    """What the worker does for one MegaContext request in one step."""

    # Contents of the scheduled slots, in order: token id >= 0, or -1 for a gist slot.
    tokens: list[int]
    gists: list[NodeId | None]  # the gist node where tokens[i] == -1
    positions: list[int]  # RoPE position of every scheduled slot
    sample: bool  # keep the sampled token (False while ingesting)
    history: list[int] = field(default_factory=list)  # tokens appended to the history
    score: list[NodeId] | None = None  # score these working-context entries after the step
    sample_offset: int = 0  # sample from the slot this far before the last (-1: seal gist)


@dataclass
class MCStep:
    """Everything MegaContext asks of the worker in one step."""

    plans: dict[str, MCRequestPlan] = field(default_factory=dict)
    ops: list[KVOp] = field(default_factory=list)  # KV edits, applied in order before the forward
    configs: dict[str, dict] = field(default_factory=dict)  # new requests' options


@dataclass
class MCResults:
    """What the worker reports back: LensNet scores per request, and its own cost."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    forward_tokens: dict[str, int] = field(default_factory=dict)  # slots the model processed
    aux_seconds: float = 0.0  # GistNet + LensNet + slot copies
    failed: dict[str, str] = field(default_factory=dict)  # request id -> error (finish it)


# KV edits (worker side, applied in order before the forward by ``kv_ops.apply_ops``).
# A slot is a physical token slot: page_id * block_size + offset within the page.


@dataclass(frozen=True)
class CopySlots:
    """Copy whole slots ``src[i] -> dst[i]`` (K and V, every layer).

    The result is that of doing the copies one after another in list order, so chains
    (a->b then b->c) and swaps through a scratch slot behave as written.
    """

    src: list[int]
    dst: list[int]

    def __post_init__(self) -> None:
        if len(self.src) != len(self.dst):
            raise ValueError(f"CopySlots: {len(self.src)} sources for {len(self.dst)} destinations")


@dataclass(frozen=True)
class RotateKeys:
    """Re-rotate the cached K of ``slots`` by ``delta`` RoPE positions (compact mode).

    RoPE rotations compose, so a key written at position p reads as written at p + delta.
    V carries no position and is left alone.
    """

    delta: int
    slots: list[int]


@dataclass(frozen=True)
class SaveGist:
    """Copy one slot's K and V (every layer) into row ``row`` of the worker's side store."""

    slot: int
    row: int


@dataclass(frozen=True)
class PlaceGist:
    """Write side-store row ``row`` (K and V, every layer) into ``slot``."""

    row: int
    slot: int


KVOp = CopySlots | RotateKeys | SaveGist | PlaceGist
