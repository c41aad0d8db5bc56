"""MegaContext configuration: one typed, validated record with the DESIGN.md defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

BLOCK_SIZE = 32  # K: one LOD0 block = one vLLM KV page; everything else assumes it.

PositionMode = Literal["absolute", "compact"]
GistTiming = Literal["seal", "collapse"]


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


@dataclass(frozen=True)
class MCConfig:
    """Deployment options of MegaContext (DESIGN.md defaults)."""

    block_size: int = BLOCK_SIZE
    w_max: int = 8192
    n_diff: int = 4
    cooldown: int = 2
    tau_expand: float = 0.2
    tau_collapse: float = 0.2
    refocus_every: int = BLOCK_SIZE
    gist_levels: int = 2
    position_mode: PositionMode = "compact"
    # When the vLLM runtime computes a gist's KV: at collapse time (one extra token at the
    # tail, attending to the working context then) or at seal time (one extra token right
    # after the block's last one, kept in a side store and placed by a slot copy).
    gist_timing: GistTiming = "collapse"
    debug_invariants: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ConfigError(f"MCConfig.{field}={getattr(self, field)!r}: {why}")

        if self.block_size != BLOCK_SIZE:
            bad("block_size", f"must be {BLOCK_SIZE} (one LOD0 block is one 32-slot KV page)")
        if not isinstance(self.w_max, int) or self.w_max < 4 * self.block_size:
            bad("w_max", f"must be an int >= {4 * self.block_size} (at least 4 blocks)")
        if not isinstance(self.n_diff, int) or self.n_diff < 2:
            # Each collapse refunds K-1; keeping K free for the next block can take two.
            bad("n_diff", "must be an int >= 2 (room for the next block can take 2 collapses)")
        if not isinstance(self.cooldown, int) or self.cooldown < 0:
            bad("cooldown", "must be an int >= 0")
        for name in ("tau_expand", "tau_collapse"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                bad(name, "must be in [0, 1]")
        if self.refocus_every != self.block_size:
            bad("refocus_every", f"must equal block_size ({self.block_size}): refocus runs at seal")
        if not isinstance(self.gist_levels, int) or not 1 <= self.gist_levels <= 4:
            bad("gist_levels", "must be an int in [1, 4]")
        if self.position_mode not in ("absolute", "compact"):
            bad("position_mode", "must be 'absolute' or 'compact'")
        if self.gist_timing not in ("seal", "collapse"):
            bad("gist_timing", "must be 'seal' or 'collapse'")

    @property
    def top_level(self) -> int:
        return self.gist_levels

    def replace(self, **changes: Any) -> MCConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MCConfig:
        """Build from user JSON (``--additional-config``, ``extra_args``); unknown keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown MegaContext option(s) {unknown}; known: {sorted(fields)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
