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
    # KV edits, applied in order before the forward:
    #   ("copy", [(src slot, dst slot), ...])  whole-slot copies (K and V, every layer)
    #   ("rot", delta, [slot, ...])            re-rotate K by delta positions (compact mode)
    #   ("save", request id, node, slot)       keep a seal-time gist's KV in the side store
    #   ("place", request id, node, slot)      write a stored gist's KV into a slot
    ops: list[tuple] = field(default_factory=list)
    configs: dict[str, dict] = field(default_factory=dict)  # new requests' options


@dataclass
class MCResults:
    """What the worker reports back: LensNet scores per request, and its own cost."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    forward_tokens: dict[str, int] = field(default_factory=dict)  # slots the model processed
    aux_seconds: float = 0.0  # GistNet + LensNet + slot copies
