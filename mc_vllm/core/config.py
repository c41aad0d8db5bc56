"""MegaContext configuration: one typed, validated record with the DESIGN.md defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

BLOCK_SIZE = 32  # K: one LOD0 block = one vLLM KV page; everything else assumes it.

PositionMode = Literal["absolute", "compact"]
GistTiming = Literal["seal", "collapse"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with the field's name.

    ``field``/``value``/``why`` are set when one field is to blame, so a caller can name
    the field as its user spelled it (``mc_w_max``, ``megacontext.w_max``): ``renamed``.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None,
                 why: str | None = None) -> None:
        super().__init__(message)
        self.field, self.value, self.why = field, value, why

    @classmethod
    def of(cls, prefix: str, field: str, value: Any, why: str) -> ConfigError:
        return cls(f"{prefix}{field}={short_repr(value)}: {why}", field=field, value=value, why=why)

    def renamed(self, prefix: str) -> ConfigError:
        """The same error with the field named ``prefix + field``."""
        if self.field is None or self.why is None:
            return self
        return ConfigError.of(prefix, self.field, self.value, self.why)


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: error messages echo hostile input."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({type(value).__name__})"


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    return None


FLAG_WORDS = "true/false, 1/0, yes/no or on/off"


def parse_flag(value: Any, name: str, *, none_is_false: bool = False) -> bool:
    """A boolean option as users send it: ``True``/``False``, ``1``/``0`` or the strings
    true/false, yes/no, on/off, 1/0 (any case). Anything else is a ConfigError that starts
    with ``name``."""
    if value is None and none_is_false:
        return False
    flag = _flag(value)
    if flag is None:
        raise ConfigError(f"{name}={short_repr(value)}: expected a boolean ({FLAG_WORDS}), "
                          f"got {type(value).__name__}")
    return flag


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
    # Refocus rounds at the end of a prompt, one prompt token each (core.allocator.
    # prompt_refocus_points): gist_levels of them let a top-level gist reach raw tokens; the
    # rest let the scorer correct a first choice once it sees the expanded children
    # (measured on the tiny reader, passkey at 8x W_max: 7/20 with 2 rounds, 10/20 with 4).
    prompt_refocus_rounds: int = 4
    position_mode: PositionMode = "compact"
    # When the vLLM runtime computes a gist's KV: at collapse time (one extra token at the
    # tail, attending to the working context then) or at seal time (one extra token right
    # after the block's last one, kept in a side store and placed by a slot copy).
    gist_timing: GistTiming = "collapse"
    debug_invariants: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ConfigError.of("MCConfig.", field, getattr(self, field), why)

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
        if not isinstance(self.prompt_refocus_rounds, int) or not (
                self.gist_levels <= self.prompt_refocus_rounds <= 32):
            bad("prompt_refocus_rounds", f"must be an int in [gist_levels={self.gist_levels}, 32] "
                "(a top-level gist needs one round per level to reach raw tokens)")
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
    def from_dict(cls, d: Mapping[str, Any], *, prefix: str = "MCConfig.",
                  also_known: Iterable[str] = ()) -> MCConfig:
        """Build from user JSON (``--additional-config``, ``extra_args``), strictly.

        Unknown keys are errors; ints must be ints (not bools, floats or strings), floats
        ints or floats (not bools); booleans may also be ``0/1`` or ``"true"/"false"``-like
        strings and are normalised. Every error starts with ``prefix + field``
        (``also_known``: the caller's own keys, listed with the known ones in that error).
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping of MegaContext "
                              f"options, got {type(d).__name__}")
        kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
        unknown = sorted(short_repr(k)[1:-1] if isinstance(k, str) else short_repr(k)
                         for k in d if k not in kinds)
        if unknown:
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise ConfigError(
                f"{', '.join(prefix + k for k in unknown[:5])}{more}: unknown MegaContext option"
                f"; known: {', '.join(prefix + k for k in sorted({*kinds, *also_known}))}"
            )
        values = {k: _coerce(prefix, k, v, kinds[k]) for k, v in d.items()}
        try:
            return cls(**values)
        except ConfigError as e:
            raise e.renamed(prefix) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(prefix: str, field: str, value: Any, kind: type) -> Any:
    """One option's value checked against its field's type (bool is not an int here)."""

    def bad(why: str) -> ConfigError:
        return ConfigError.of(prefix, field, value, why)

    if kind is bool:
        flag = _flag(value)
        if flag is None:
            raise bad(f"expected a boolean ({FLAG_WORDS}), got {type(value).__name__}")
        return flag
    if kind is int:
        if type(value) is not int:
            raise bad(f"must be an int, got {type(value).__name__}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number, got {type(value).__name__}")
        try:
            return float(value)
        except OverflowError:
            raise bad("out of range") from None
    if kind is str:
        if not isinstance(value, str):
            raise bad(f"must be a str, got {type(value).__name__}")
        return value
    return value
