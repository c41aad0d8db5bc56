"""MegaContext's Prometheus series on vLLM's ``/metrics``.

The numbers live in the engine-core process (the scheduler); ``/metrics`` is served by the
API-server process. The scheduler publishes a small JSON snapshot (:class:`MCMetrics`) to a
directory the server created (``MC_VLLM_METRICS_DIR``, one file per engine core, replaced
atomically, at most every 0.5 s and at every request's end); a collector registered in the
server's Prometheus registry reads them at scrape time and sums over engine cores. No
vLLM import: the scheduler passes itself duck-typed.

Series (``vllm:`` prefix like vLLM's own; counters get ``_total``):

* counters: ``vllm:mc_requests``, ``vllm:mc_refocuses``, ``vllm:mc_expands``,
  ``vllm:mc_collapses``, ``vllm:mc_ingest_tokens`` (history tokens ingested),
  ``vllm:mc_ingest_seconds`` (admission to first sample), ``vllm:mc_restored_tokens``
  (history tokens a session supplied, not ingested again), ``vllm:mc_history_tokens``
  (history tokens requests brought);
* gauges: ``vllm:mc_running_history_tokens``, ``vllm:mc_working_context_entries{level}``,
  ``vllm:mc_working_context_fill`` (cost / W_max over running requests),
  ``vllm:mc_retained_pages``, ``vllm:mc_sessions_open``, ``vllm:mc_sessions_on_disk``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DIR_ENV = "MC_VLLM_METRICS_DIR"
_COUNTERS = {
    "requests": "MegaContext requests admitted",
    "refocuses": "Refocus steps (LensNet scores applied by the Focus Allocator)",
    "expands": "Working-context expands (a gist replaced by its children)",
    "collapses": "Working-context collapses (children replaced by their gist)",
    "ingest_tokens": "History tokens ingested",
    "ingest_seconds": "Seconds from admission to first sample, summed over requests",
    "restored_tokens": "History tokens a persistent session supplied (not ingested again)",
    "history_tokens": "History tokens requests brought",
}
_GAUGES = {
    "running_history_tokens": "History tokens of running MegaContext requests",
    "working_context_fill": "Working-context cost over W_max, running requests together",
    "retained_pages": "Collapsed LOD0 pages kept for free re-expansion",
    "sessions_open": "Persistent sessions in use by a request",
    "sessions_on_disk": "Persistent sessions stored",
}


@dataclass
class MCMetrics:
    """One engine core's MegaContext counters and gauges (see the module docstring)."""

    requests: int = 0
    refocuses: int = 0
    expands: int = 0
    collapses: int = 0
    ingest_tokens: int = 0
    ingest_seconds: float = 0.0
    restored_tokens: int = 0
    history_tokens: int = 0
    running_history_tokens: int = 0
    working_context_fill: float = 0.0
    working_context_entries: dict[str, int] = field(default_factory=dict)  # level -> entries
    retained_pages: int = 0
    sessions_open: int = 0
    sessions_on_disk: int = 0
    path: str | None = field(default=None, repr=False)
    _published: float = field(default=0.0, repr=False)
    _disk_checked: float = field(default=0.0, repr=False)

    @classmethod
    def for_engine(cls) -> MCMetrics:
        """Publishing to ``$MC_VLLM_METRICS_DIR/engine-<pid>.json`` when set (the server
        sets it), else kept in memory only (offline: read ``scheduler.metrics``)."""
        d = os.environ.get(DIR_ENV)
        return cls(path=str(Path(d) / f"engine-{os.getpid()}.json") if d else None)

    def publish(self, scheduler: Any, force: bool = False) -> None:
        """Refresh the gauges from the scheduler's live requests and write the snapshot
        (throttled to every 0.5 s unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._published < 0.5:
            return
        self._published = now
        try:
            self._publish(scheduler, now, force)
        except OSError:
            pass  # a metrics file or session listing gone away: skip this snapshot, go on

    def _publish(self, scheduler: Any, now: float, force: bool) -> None:
        live = list(scheduler.mc.values())
        self.running_history_tokens = sum(st.tree.num_tokens for st in live)
        w = sum(st.cfg.w_max for st in live)
        self.working_context_fill = sum(st.wc.cost for st in live) / w if w else 0.0
        by_level: dict[str, int] = {}
        for st in live:
            for level, n in st.wc.count_by_level().items():
                by_level[str(level)] = by_level.get(str(level), 0) + n
        self.working_context_entries = by_level
        self.retained_pages = sum(len(st.layout.retained) for st in live)
        self.sessions_open = len(scheduler._session_users)
        if now - self._disk_checked > 5 or force:
            self._disk_checked = now
            root = scheduler.sessions.root
            self.sessions_on_disk = (sum((p / "lod0.bin").is_file() for p in root.iterdir()
                                         if not p.name.startswith("."))
                                     if root.is_dir() else 0)
        if self.path:
            data = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "path"}
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)


class MCCollector:
    """A ``prometheus_client`` collector over the engine cores' snapshots in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _snapshots(self) -> list[dict]:
        out = []
        for f in sorted(self.directory.glob("engine-*.json")):
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue  # being replaced: the next scrape reads it
        return out

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snaps = self._snapshots()
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"vllm:mc_{name}", doc,
                                      value=sum(s.get(name, 0) for s in snaps))
        for name, doc in _GAUGES.items():
            yield GaugeMetricFamily(f"vllm:mc_{name}", doc, value=sum(s.get(name, 0) for s in snaps))
        g = GaugeMetricFamily("vllm:mc_working_context_entries",
                              "Working-context entries of running requests, by LOD level",
                              labels=["level"])
        levels: dict[str, int] = {}
        for s in snaps:
            for level, n in s.get("working_context_entries", {}).items():
                levels[level] = levels.get(level, 0) + n
        for level in sorted(levels):
            g.add_metric([level], levels[level])
        yield g


_registered: str | None = None


def serve_metrics() -> None:
    """In the API-server process, before it starts the engine core: a fresh snapshot
    directory (inherited by the engine core through the environment) and the collector in
    the default Prometheus registry, which vLLM's ``/metrics`` serves. Idempotent."""
    global _registered
    if _registered is not None:
        return
    import tempfile

    from prometheus_client import REGISTRY

    d = tempfile.mkdtemp(prefix="mc-vllm-metrics-")
    os.environ[DIR_ENV] = d
    REGISTRY.register(MCCollector(d))
    _registered = d
