"""MCScheduler: vLLM's scheduler plus MegaContext requests (``--scheduler-cls``).

Plain requests are scheduled by vLLM untouched. A MegaContext request is a normal vLLM
request whose token list is kept equal to the *mirror* of its KV layout (the contents of
its slots in block-table order, then the slots still to compute), so vLLM's own chunked
prefill, allocation, preemption and freeing apply to it. Around vLLM's ``schedule()`` we
feed ingest chunks, seal blocks and apply refocus edits; around ``update_from_output()``
we record sampled tokens in the history and run the Focus Allocator on LensNet's scores.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.allocator import (
    FocusAllocator,
    ingest_room,
    max_ingest_chunk,
    prompt_refocus_points,
)
from ..core.config import BLOCK_SIZE, MCConfig
from ..core.sessions import SessionError, SessionState, SessionWriter, common_prefix
from ..core.storage import StorageError
from ..core.tree import MegaContextTree, node_start
from ..core.working_context import (
    Action,
    InvariantError,
    WorkingContext,
    check_invariants,
    describe,
)
from .compat import patches
from .contract import check_engine
from .layout import (
    SEAL_TAG,
    Content,
    Edit,
    KVLayout,
    absolute_position,
    gist_slot,
    seal_gist_slot,
    token_slot,
)
from .metrics import MCMetrics
from .options import PROMPT_KEY, SESSION_KEY, EngineOptions, request_options, session_meta
from .records import (
    CopySlots,
    KVOp,
    MCRequestPlan,
    MCResults,
    MCStep,
    PlaceGist,
    RotateKeys,
    SaveGist,
)

K = BLOCK_SIZE
logger = logging.getLogger(__name__)
Scheduler = patches().Scheduler


@dataclass
class MCRequestStats:
    refocuses: int = 0
    expands: int = 0
    collapses: int = 0
    recomputed_blocks: int = 0
    forced_collapses: int = 0
    seals: int = 0
    slot_copies: int = 0
    rerotated_slots: int = 0
    seal_gists: int = 0  # seal-time gist KVs computed and stored
    placed_gists: int = 0  # collapses that placed a stored gist (no forward)
    max_pages_held: int = 0
    released_retained: int = 0  # retained pages given back to vLLM under memory pressure
    # decode phase (after the first sampled token), for the no-hidden-recompute check:
    decode_forward_tokens: int = 0  # slots the worker's model forward processed
    decode_tokens_fed: int = 0  # generated tokens fed back
    decode_gists: int = 0  # gist slots computed
    decode_recomputed_blocks: int = 0
    # cost of the machinery in decode, seconds: scheduler side (allocator, layout edits,
    # bookkeeping) and worker side (GistNet, LensNet, slot copies)
    scheduler_seconds: float = 0.0
    worker_aux_seconds: float = 0.0
    # persistent sessions: history tokens taken from the session (not ingested again) and
    # working-context slots recomputed to resume its checkpoint
    restored_tokens: int = 0
    restored_slots: int = 0
    ingested_tokens: int = 0  # history tokens fed through ingest by this request


@dataclass
class MCRequest:
    """Scheduler-side MegaContext state of one request."""

    rid: str
    cfg: MCConfig
    prompt: np.ndarray
    tree: MegaContextTree
    alloc: FocusAllocator
    layout: KVLayout
    wc: WorkingContext
    fed: int = 0  # prompt tokens appended to the history so far
    # prompt-end refocus points (history lengths; core.allocator.prompt_refocus_points)
    holds: list[int] = field(default_factory=list)
    scored_hold: int = -1  # the last of them whose scores were asked for
    outputs_seen: int = 0
    history_delta: list[int] = field(default_factory=list)  # not yet sent to the worker
    table_dirty: bool = False
    mirror_dirty: bool = True
    queued: list[Action] = field(default_factory=list)  # external edits (tests, pins)
    # RoPE position each computed slot holds, by (level, index): compact mode re-rotates
    # slots whose rank changed; debug mode checks them against the working context.
    written: dict[tuple[int, int], int] = field(default_factory=dict)
    # seal-time gists in the worker's side store: block -> row, and the position their K
    # was rotated to
    side_rows: dict[int, int] = field(default_factory=dict)
    sealed_pos: dict[int, int] = field(default_factory=dict)
    # positions held by the slots of pages in the retained tier (restored on expand, so
    # compact mode re-rotates them by whatever shift happened while they were out)
    retained_pos: dict[int, dict[tuple[int, int], int]] = field(default_factory=dict)
    edits: int = 0  # bumped by every working-context edit (cache key)
    answer_wc: list[tuple[int, int]] = field(default_factory=list)  # see MCSummary
    last_plan_decode: bool = False
    stats: MCRequestStats = field(default_factory=lambda: MCRequestStats())
    session: SessionWriter | None = None  # the persistent session this request extends
    ingest_started: float = 0.0  # perf_counter at admission; ingest time ends at first sample
    _bases: tuple[tuple[int, int], dict] | None = field(default=None, repr=False)

    def compact_bases(self) -> dict[tuple[int, int], int]:
        """Compact-mode entry ranks, cached until the working context changes."""
        key = (self.edits, len(self.wc.entries))
        if self._bases is None or self._bases[0] != key:
            self._bases = (key, self.wc.compact_offsets())
        return self._bases[1]

    @property
    def ingesting(self) -> bool:
        return self.fed < len(self.prompt)

    def block_tokens(self, b: int) -> list[int]:
        return self.tree.block_tokens(b).tolist()


@dataclass
class MCSummary:
    """What a user sees of one finished MegaContext request."""

    history_len: int
    wc_entries_by_level: dict[int, int]
    wc_cost: int
    w_max: int
    stats: MCRequestStats
    # the working context the first output token was sampled from (entries, time order)
    answer_wc: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> str:
        s = self.stats
        wc = describe(self.history_len, self.wc_entries_by_level, self.wc_cost, self.w_max)
        return (
            f"{wc} | refocuses={s.refocuses} expands={s.expands} collapses={s.collapses} "
            f"(forced {s.forced_collapses}) | KV pages held <= {s.max_pages_held} | "
            f"slot copies={s.slot_copies}"
        )


def slot_position(c: Content | tuple[int, int], mode: str, bases: dict | None) -> int:
    if mode == "absolute":
        return absolute_position((c[0], c[1], 0))
    assert bases is not None
    if c[0] == 0:
        return bases[(0, c[1] // K)] + c[1] % K
    if (c[0], c[1]) not in bases and c[0] == 1:
        return bases[(0, c[1])]  # a seal-time gist: the rank its block holds now
    return bases[(c[0], c[1])]


class MCScheduler(Scheduler):  # type: ignore[misc, valid-type]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_engine(patches().read_engine_settings(self.vllm_config))
        self.mc_options = EngineOptions.from_additional_config(
            self.vllm_config.additional_config
        )
        self.mc: dict[str, MCRequest] = {}
        self.finished_summaries: OrderedDict[str, MCSummary] = OrderedDict()  # bounded
        self._mc_ops: list[KVOp] = []
        # free rows of the worker's preallocated side store (seal-time gist KV)
        self._side_rows = list(range(self.mc_options.side_store_rows))[::-1]
        self._mc_new_configs: dict[str, dict] = {}
        self.pages = patches().KVPages(self)
        # persistent sessions: one request at a time per session (later ones are parked
        # here, outside vLLM, until it finishes: serialised, never interleaved)
        self.sessions = self.mc_options.session_root()
        self._session_users: dict[str, str] = {}  # session id -> request id
        self._parked: OrderedDict[str, Any] = OrderedDict()  # request id -> request
        self.metrics = MCMetrics.for_engine()
        self.failures: OrderedDict[str, str] = OrderedDict()  # request id -> error (bounded)
        self._failed: list[Any] = []  # finished with an error, output not yet emitted
        # prefix caching stays on for plain requests; MegaContext pages are never committed
        patches().guard_cache_blocks(self, self.mc.__contains__)
        patches().guard_allocate_slots(self, self._release_retained_page)

    # ---- admission ---------------------------------------------------------------------

    def add_request(self, request: Any) -> None:
        sp = request.sampling_params
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        try:
            cfg = request_options(extra, self.mc_options.defaults) if extra else None
        except ValueError as e:  # the front end validates first; never take the engine down
            super().add_request(request)
            return self._fail(request.request_id, e)
        if cfg is None:
            return super().add_request(request)
        sid = extra.get(SESSION_KEY)
        if isinstance(sid, str) and sid in self._session_users:
            self._parked[request.request_id] = request  # its session is busy: wait
            return None
        try:
            st = self._admit(request, cfg)
        except Exception as e:
            super().add_request(request)
            return self._fail(request.request_id, e)
        super().add_request(request)
        self._guard(request.request_id, self._feed, request, st)

    def _admit(self, request: Any, cfg: MCConfig) -> MCRequest:
        """MegaContext state for a new request. The history comes from ``mc_prompt`` (read,
        never popped: n > 1 children share one ``extra_args`` dict in-process), else from the
        prompt; the request keeps its own copy of the sampling params without it, so the
        history is not shipped to the workers with every new request."""
        sp = request.sampling_params
        history = sp.extra_args.get(PROMPT_KEY)
        prompt = np.asarray(history if history is not None else request.prompt_token_ids,
                            dtype=np.int64)
        if history is not None:
            sp = request.sampling_params = copy.copy(sp)
            sp.extra_args = {k: v for k, v in sp.extra_args.items() if k != PROMPT_KEY}
        st = MCRequest(
            rid=request.request_id,
            cfg=cfg,
            prompt=prompt,
            tree=MegaContextTree(embed_dim=0, embed_fn=None, gist_fn=None, gist_levels=cfg.gist_levels),
            alloc=FocusAllocator(cfg),
            layout=KVLayout(self.mc_options.retained_cap),
            wc=WorkingContext([], 0, cfg.w_max),
            holds=prompt_refocus_points(len(prompt), cfg.w_max, cfg.prompt_refocus_rounds),
        )
        st.ingest_started = time.perf_counter()
        patches().opt_out_of_prefix_cache(request)
        sid = sp.extra_args.get(SESSION_KEY)
        if sid is not None:
            self._open_session(st, sid)  # last: nothing after it may fail and leak the lock
        self.mc[request.request_id] = st
        self._mc_new_configs[request.request_id] = cfg.to_dict()
        self.metrics.requests += 1
        self.metrics.history_tokens += len(prompt)
        return st

    # ---- persistent sessions ---------------------------------------------------------------

    def _open_session(self, st: MCRequest, sid: str) -> None:
        """Take the session (its store's writer lock), check that its stored history is a
        prefix of this request's, and resume its checkpoint: the checkpoint's tokens join
        the history without being ingested again, its working context is recomputed (at
        most W_max slots), the rest of the history is ingested as usual.
        Raises SessionError (mismatch, limits) or StorageError (unreadable, locked)."""
        cfg = st.cfg
        root = self.sessions
        if root.max_tokens and len(st.prompt) > root.max_tokens:
            raise SessionError(f"{SESSION_KEY}={sid!r}: history of {len(st.prompt)} tokens is "
                               f"over the per-session limit of {root.max_tokens}")
        meta = session_meta(self.vllm_config.model_config, cfg.gist_levels)
        writer = SessionWriter(root, sid, meta)
        try:
            n = common_prefix(writer.stored, st.prompt)
            if n < writer.num_tokens:
                raise SessionError(f"{SESSION_KEY}={sid!r}: the history diverges from the "
                                   f"stored one at token {n} of {writer.num_tokens}", 409)
            state = writer.state
            if state is not None and self._resume(st, state, writer.stored):
                st.stats.restored_tokens = st.fed
                self.metrics.restored_tokens += st.fed
        except BaseException:
            writer.close()
            raise
        st.session = writer
        self._session_users[sid] = st.rid

    def _resume(self, st: MCRequest, state: SessionState, stored: np.ndarray) -> bool:
        """Resume a checkpoint (False if it does not fit this request's config: then the
        whole history is ingested again). Its working context goes to ``layout.pending``
        in time order, so vLLM computes it like a prefill of at most W_max slots."""
        cfg, n = st.cfg, state.history_len
        if (n <= 0 or n > len(stored) or state.w_max != cfg.w_max
                or state.gist_levels != cfg.gist_levels):
            return False
        entries = list(state.entries)
        if n == len(st.prompt):
            # nothing new: the last token is fed again, so the first sample is read from a
            # token slot (as after any ingest), not from whatever the checkpoint ends with
            n -= 1
            if not entries or entries[-1][0] != 0:
                return False  # the last block was collapsed: ingest everything again
            if n == entries[-1][1] * K:
                entries.pop()
            if n == 0:
                return False
        wc = WorkingContext(entries, n, cfg.w_max)
        try:
            check_invariants(wc, top_level=cfg.top_level)
        except InvariantError:
            return False
        toks = st.prompt[:n]
        st.tree.append(toks)
        if wc.free < K:  # ingest resumes as it would have gone on: room for a block first
            for a in st.alloc.make_room(wc, st.tree, K):
                wc.apply(a)
        st.wc = wc
        st.fed = n
        st.history_delta = toks.tolist()
        st.alloc.step = state.allocator_step
        st.alloc.last_flip = {(lv, i): t for lv, i, t in state.last_flip}
        st.holds = [h for h in st.holds if h > n]
        pending: list[Content] = []
        for e, length in zip(wc.entries, wc.entry_lengths(), strict=True):
            if e[0] == 0:
                start = e[1] * K
                pending += [token_slot(start + j, int(t))
                            for j, t in enumerate(st.prompt[start : start + length])]
            else:
                pending.append(gist_slot(e))
        st.layout.pending = pending
        st.stats.restored_slots = len(pending)
        return True

    def _checkpoint(self, st: MCRequest, final: bool) -> None:
        """Record the session's working context for the history ingested so far (at the end:
        the one the answer was read from, which tiles the whole prompt)."""
        assert st.session is not None
        if final and st.answer_wc:
            entries, n = st.answer_wc, len(st.prompt)
        else:
            entries, n = list(st.wc.entries), st.fed
        old = st.session.state
        st.session.checkpoint(SessionState(
            history_len=n, w_max=st.cfg.w_max, gist_levels=st.cfg.gist_levels,
            entries=list(entries), allocator_step=st.alloc.step,
            last_flip=[(lv, i, t) for (lv, i), t in st.alloc.last_flip.items()],
            requests=(old.requests if old else 0) + int(final)))

    def _release_session(self, st: MCRequest, ok: bool) -> None:
        """End a request's use of its session: final checkpoint (unless it failed: the last
        good one stands), unlock, wake the next request parked on it, apply retention."""
        writer = st.session
        assert writer is not None
        try:
            if ok:
                self._checkpoint(st, final=True)
        finally:
            # first: whatever the disk does, the session is free again (parked requests
            # on it are admitted at the next schedule())
            st.session = None
            self._session_users.pop(writer.id, None)
            writer.close()
        self.sessions.enforce_retention(keep=set(self._session_users))

    def _admit_parked(self) -> None:
        """Admit, in arrival order, every parked request whose session is free now."""
        for rid, request in list(self._parked.items()):
            if request.sampling_params.extra_args.get(SESSION_KEY) not in self._session_users:
                del self._parked[rid]
                self.add_request(request)

    def get_num_unfinished_requests(self) -> int:
        # parked requests count (the engine loop must keep stepping until they run), except
        # while vLLM is paused with mode "keep" (v1/core/sched/interface.py PauseState)
        n = super().get_num_unfinished_requests()
        paused = getattr(getattr(self, "_pause_state", None), "name", "") == "PAUSED_ALL"
        return n if paused else n + len(self._parked)

    def finish_requests(self, request_ids: Any, finished_status: Any) -> list[Any]:
        """vLLM's, plus parked requests (aborted before they reached vLLM's queues: they
        are returned too, so an abort-all tells their clients)."""
        if request_ids is not None and not isinstance(request_ids, str):
            request_ids = list(request_ids)  # iterated twice: here and by vLLM
        ids = ([request_ids] if isinstance(request_ids, str)
               else list(self._parked) if request_ids is None else request_ids)
        parked = [r for r in (self._parked.pop(rid, None) for rid in ids) if r is not None]
        for request in parked:
            request.status = finished_status
        return super().finish_requests(request_ids, finished_status) + parked

    # ---- fault isolation -----------------------------------------------------------------

    def _fail(self, rid: str, err: BaseException) -> None:
        """Finish one request with an error (``finish_reason="error"``) after an exception in
        MegaContext code; the engine and every other request go on."""
        logger.error("MegaContext request %s failed: %s: %s", rid, type(err).__name__, err,
                     exc_info=err)
        self.failures[rid] = f"{type(err).__name__}: {err}"
        while len(self.failures) > 4096:
            self.failures.popitem(last=False)
        st = self.mc.get(rid)
        if st is not None and rid in self.requests:
            # the edit may have stopped between the layout and vLLM's table: vLLM frees the
            # table, so it must list exactly the pages the layout holds (none twice, none lost)
            self.pages.set_table(rid, st.layout.table())
        self._failed += self.finish_requests(rid, patches().FINISHED_ERROR)

    def _guard(self, rid: str, fn: Any, *args: Any) -> bool:
        """Run one request's MegaContext work; False if it failed (and was finished)."""
        try:
            fn(*args)
        except Exception as e:
            self._fail(rid, e)
            return False
        return True

    # ---- vLLM state sync ---------------------------------------------------------------

    def _sync_request(self, request: Any, st: MCRequest) -> None:
        """Make vLLM's view (token list, computed count, block table) match the layout."""
        if not st.mirror_dirty:
            return  # vLLM's own appends kept it in step
        st.mirror_dirty = False
        self.pages.set_tokens(request, st.layout.mirror(st.block_tokens))
        request.num_computed_tokens = st.layout.num_computed
        self.pages.set_table(request.request_id, st.layout.table())

    def _apply_edit(self, st: MCRequest, edit: Edit) -> None:
        if edit.copies:
            self._mc_ops.append(CopySlots([c[0] for c in edit.copies], [c[1] for c in edit.copies]))
        st.mirror_dirty = True
        st.stats.slot_copies += len(edit.copies)
        self.pages.free(edit.freed)
        st.table_dirty |= edit.table_changed

    def _fresh_page(self) -> int:
        return self.pages.allocate()

    def _apply_actions(self, st: MCRequest, actions: list[Action]) -> None:
        if not actions:
            return  # nothing moved: no slot to forget, no position to settle (most refocuses)
        st.edits += 1
        for a in actions:
            st.wc.apply(a)
            level = a.node[0]
            if a.op == "collapse" and level == 1:
                b = a.node[1]
                keys = [(0, b * K + j) for j in range(K)]
                if all(k in st.written for k in keys):
                    st.retained_pos[b] = {k: st.written[k] for k in keys}
                edit = st.layout.collapse_block(b)
                st.retained_pos = {
                    r: v for r, v in st.retained_pos.items() if r in st.layout.retained
                }
                lay = st.layout
                room = len(lay.tail) < K * len(lay.tail_pages) or self.pages.num_free() > 0
                if b in st.side_rows and room:  # seal-time KV stored: a slot copy, no forward
                    placed, phys = st.layout.place_gist(a.node[1], self._fresh_page)
                    self._apply_edit(st, edit.merge(placed))
                    self._mc_ops.append(PlaceGist(row=st.side_rows[b], slot=phys))
                    st.written[a.node] = st.sealed_pos[a.node[1]]
                    st.stats.placed_gists += 1
                    st.stats.collapses += 1
                    self.metrics.collapses += 1
                    continue
            elif a.op == "expand" and level == 1:
                edit, recomputed = st.layout.expand_block(a.node[1], st.block_tokens(a.node[1]))
                restored = st.retained_pos.pop(a.node[1], {})
                if not recomputed:
                    st.written.update(restored)
                st.stats.recomputed_blocks += recomputed
                if st.outputs_seen:
                    st.stats.decode_recomputed_blocks += recomputed
            else:
                old, new = (a.removed, a.added)
                edit = st.layout.replace_gists(old, new)
            self._apply_edit(st, edit)
            st.stats.expands += a.op == "expand"
            st.stats.collapses += a.op == "collapse"
            self.metrics.expands += a.op == "expand"
            self.metrics.collapses += a.op == "collapse"
        self._settle_positions(st)
        if st.cfg.debug_invariants:
            check_invariants(st.wc, top_level=st.cfg.top_level)

    def _settle_positions(self, st: MCRequest) -> None:
        """After edits: forget removed slots; in compact mode re-rotate the K of every
        computed slot whose rank moved (RoPE rotations compose: rotate by the shift)."""
        slots = st.layout.computed_slots()
        st.written = {k: v for k, v in st.written.items() if k in slots}
        if st.cfg.position_mode != "compact" or not st.written:
            return
        bases = st.compact_bases()
        by_delta: dict[int, list[int]] = {}
        for key, old in st.written.items():
            new = slot_position(key, "compact", bases)
            if new != old:
                by_delta.setdefault(new - old, []).append(slots[key])
                st.written[key] = new
        for delta, phys in sorted(by_delta.items()):
            self._mc_ops.append(RotateKeys(delta, phys))
            st.stats.rerotated_slots += len(phys)

    def _seal_ready_blocks(self, st: MCRequest) -> None:
        for b in st.layout.sealable_blocks():
            if self.pages.num_free() < 1:
                return  # no page to seal into this step; the tail keeps the tokens
            self._apply_edit(st, st.layout.seal(b, self._fresh_page))
            st.stats.seals += 1

    def _feed(self, request: Any, st: MCRequest) -> None:
        """Ingest: make room, then append the next prompt chunk to history and pending."""
        if not st.ingesting or st.layout.pending:
            return
        # the reference runtime's chunk grid (ingest_chunk = this grid), each chunk cut
        # where the budget cannot take it at once (core.allocator.ingest does the same)
        grid = min(self.mc_options.max_chunk, st.cfg.w_max // 2)
        chunk = min(len(st.prompt) - st.fed, grid - st.fed % grid,
                    max_ingest_chunk(st.tree.num_tokens, st.cfg.w_max, st.cfg.gist_levels))
        nxt = next((h for h in st.holds if h > st.fed), None)
        if nxt is not None:  # stop at the next prompt-end refocus point
            chunk = min(chunk, nxt - st.fed)
        need = ingest_room(st.tree.num_tokens, chunk)
        if st.wc.free < need:
            actions = st.alloc.make_room(st.wc, st.tree, need)
            st.stats.forced_collapses += len(actions)
            self._apply_actions(st, actions)
        toks = st.prompt[st.fed : st.fed + chunk]
        start = st.tree.num_tokens
        st.tree.append(toks)
        st.wc.grow(st.tree.num_tokens)
        st.fed += chunk
        st.stats.ingested_tokens += chunk
        self.metrics.ingest_tokens += chunk
        if st.session is not None:
            st.session.extend(st.prompt, st.fed)
            if st.fed // 4096 != (st.fed - chunk) // 4096:  # a checkpoint every 4096 tokens
                self._checkpoint(st, final=False)
        st.history_delta += toks.tolist()
        st.mirror_dirty = True
        st.layout.pending += [token_slot(start + i, int(t)) for i, t in enumerate(toks)]

    # ---- schedule ----------------------------------------------------------------------

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._admit_parked()  # requests whose session was released in the last step
        for rid, st in list(self.mc.items()):
            request = self.requests.get(rid)
            if request is None or request.num_computed_tokens != st.layout.num_computed:
                continue  # preempted / waiting: vLLM recomputes the mirror first
            self._guard(rid, self._before_schedule, request, st)
        out = super().schedule(*args, **kwargs)
        step = MCStep(ops=self._mc_ops, configs=self._mc_new_configs)
        self._mc_ops, self._mc_new_configs = [], {}
        for rid, n in out.num_scheduled_tokens.items():
            st = self.mc.get(rid)
            if st is not None and not self._guard(rid, self._after_schedule, out, step, st, n):
                step.plans.pop(rid, None)  # finished with an error: the worker runs it plain
        out.mc_step = step
        self.metrics.publish(self)
        return out

    def _before_schedule(self, request: Any, st: MCRequest) -> None:
        """Seal complete blocks, apply queued edits, feed the next ingest chunk."""
        t0 = time.perf_counter()
        self._seal_ready_blocks(st)
        if st.queued:
            self._apply_actions(st, st.queued)
            st.queued = []
        self._feed(request, st)
        self._sync_request(request, st)
        if st.outputs_seen:
            st.stats.scheduler_seconds += time.perf_counter() - t0

    def _after_schedule(self, out: Any, step: MCStep, st: MCRequest, n: int) -> None:
        """The worker's plan for the ``n`` slots vLLM scheduled; a replaced block table
        goes to the worker through the resumed-request path."""
        rid = st.rid
        cached = out.scheduled_cached_reqs
        lay = st.layout
        table = self.pages.table(rid)
        if st.table_dirty and rid in cached.req_ids:
            # first: should planning fail below, the request still runs (plain, then
            # finished with an error) on its own current pages, never on freed ones
            cached.resumed_req_ids.add(rid)
            cached.new_block_ids[cached.req_ids.index(rid)] = (table,)
        st.table_dirty = False
        lay.tail_pages = table[len(lay.lod0) :]
        plan = step.plans[rid] = self._plan(st, n)
        request = self.requests[rid]
        if request.prefill_stats is not None and request.num_preemptions <= 0:
            # what vLLM reports for the prompt (usage cached_tokens, prefix-cache metrics):
            # the history, of which the session's restored tokens were not computed again
            request.prefill_stats.set(num_prompt_tokens=len(st.prompt),
                                      num_local_cached_tokens=st.stats.restored_tokens,
                                      num_external_cached_tokens=0)
        patches().set_sampling(self, self.requests[rid], out, plan.sample)
        for c, pos in zip(lay.pending[:n], plan.positions, strict=True):
            st.written[c[:2]] = pos
        lay.computed(n)
        if st.cfg.debug_invariants:
            self._check_positions(st)
        st.stats.max_pages_held = max(st.stats.max_pages_held, lay.pages_held())

    def _plan(self, st: MCRequest, n: int) -> MCRequestPlan:
        pend = st.layout.pending
        if n == len(pend) - 1 and pend[-1][2] == SEAL_TAG:
            # vLLM split the token from its seal gist: drop the gist (the block falls back
            # to a collapse-time gist) so the token is sampled now.
            pend.pop()
            st.mirror_dirty = True
        contents = pend[:n]
        last_in_pending = n == len(pend)
        sample = last_in_pending and not st.ingesting
        offset = 0
        if contents[-1][2] == SEAL_TAG:
            offset = -1  # sample from the block's last token, not from its gist
            if len(contents) < 2:
                raise RuntimeError("a seal-time gist was scheduled without its token")
        last = contents[-1 + offset]
        ends_block = last[0] == 0 and (last[1] + 1) % K == 0 and last[1] + 1 == st.tree.num_tokens
        at_hold = last_in_pending and st.fed in st.holds and st.fed != st.scored_hold
        if at_hold:
            st.scored_hold = st.fed
        plan = MCRequestPlan(
            tokens=[c[2] if c[0] == 0 else -1 for c in contents],
            gists=[None if c[0] == 0 else (c[0], c[1]) for c in contents],
            positions=self._positions(st, contents),
            sample=sample,
            history=st.history_delta,
            score=list(st.wc.entries) if (sample and ends_block) or at_hold else None,
            sample_offset=offset,
        )
        st.history_delta = []
        if sample and not st.outputs_seen and not st.answer_wc:
            st.answer_wc = list(st.wc.entries)
            self.metrics.ingest_seconds += time.perf_counter() - st.ingest_started
        st.last_plan_decode = st.outputs_seen > 0
        if st.last_plan_decode:
            st.stats.decode_tokens_fed += sum(c[0] == 0 for c in contents)
            st.stats.decode_gists += sum(c[0] > 0 for c in contents)
        return plan

    def _positions(self, st: MCRequest, contents: list[Content]) -> list[int]:
        mode = st.cfg.position_mode
        bases = st.compact_bases() if mode == "compact" else None
        return [slot_position(c, mode, bases) for c in contents]

    def _check_positions(self, st: MCRequest) -> None:
        """Debug mode: the working-context invariants, positions included, on the positions
        the slots actually hold (slots not computed yet count as prescribed)."""
        mode = st.cfg.position_mode
        bases = st.compact_bases() if mode == "compact" else None
        computed = st.layout.computed_slots()
        actual: list[int] = []
        for e, n in zip(st.wc.entries, st.wc.entry_lengths(), strict=True):
            keys = [(0, node_start(e) + j) for j in range(n)] if e[0] == 0 else [e]
            for k in keys:
                if k in computed and k not in st.written:
                    raise InvariantError("positions", f"computed slot {k} has no recorded position")
                actual.append(st.written.get(k, slot_position(k, mode, bases)))
        check_invariants(st.wc, mode=mode, positions=actual, top_level=st.cfg.top_level)

    # ---- outputs -----------------------------------------------------------------------

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        results: MCResults | None = getattr(model_runner_output, "mc_results", None)
        scores = results.scores if results is not None else {}
        if results is not None:  # before vLLM may finish (and we forget) the request
            for rid, n in results.forward_tokens.items():
                st = self.mc.get(rid)
                if st is not None and st.last_plan_decode:
                    st.stats.decode_forward_tokens += n
                    # the worker's aux time is per step; charge it to the requests it served
                    st.stats.worker_aux_seconds += results.aux_seconds / len(results.forward_tokens)
            for rid, err in results.failed.items():  # worker-side MegaContext errors
                if rid in self.mc:
                    self._fail(rid, RuntimeError(f"worker: {err}"))
        out = super().update_from_output(scheduler_output, model_runner_output)
        for rid in scheduler_output.num_scheduled_tokens:
            st = self.mc.get(rid)
            request = self.requests.get(rid)
            if st is not None and request is not None and not request.is_finished():
                self._guard(rid, self._after_output, request, st, scores.get(rid))
        if self._failed:
            patches().emit_error_outputs(out, self._failed)
            self._failed = []
        return out

    def _after_output(self, request: Any, st: MCRequest, scores: list[float] | None) -> None:
        """After a step: stash a seal-time gist, refocus on LensNet's scores, record the
        sampled tokens in the history."""
        t0 = time.perf_counter()
        popped = st.layout.pop_seal_gist()
        if popped is not None:
            edit, block, phys = popped
            self._apply_edit(st, edit)
            pos = st.written.pop((1, block))
            if self._side_store_room(st):  # else the block falls back to a collapse-time gist
                st.side_rows[block] = row = self._side_rows.pop()
                self._mc_ops.append(SaveGist(slot=phys, row=row))
                st.sealed_pos[block] = pos
                st.stats.seal_gists += 1
        if scores is not None and len(scores) == len(st.wc.entries):
            self._refocus(st, scores)
        new = request.output_token_ids[st.outputs_seen :]
        st.outputs_seen += len(new)
        for tok in new:
            self._append_generated(st, int(tok))
        self._sync_request(request, st)
        if st.outputs_seen > 1:
            st.stats.scheduler_seconds += time.perf_counter() - t0

    def _refocus(self, st: MCRequest, scores: list[float]) -> None:
        actions = st.alloc.plan(st.wc, scores, st.tree, headroom=K)
        st.stats.refocuses += 1
        self.metrics.refocuses += 1
        self._apply_actions(st, actions)

    def _append_generated(self, st: MCRequest, tok: int) -> None:
        hist = st.tree.num_tokens
        if hist % K == 0 and st.wc.free < K:  # a block opens with no room: forced collapse
            actions = st.alloc.make_room(st.wc, st.tree, K)
            st.stats.forced_collapses += len(actions)
            self._apply_actions(st, actions)
        st.tree.append([tok])
        st.wc.grow(st.tree.num_tokens)
        st.history_delta.append(tok)
        st.layout.pending.append(token_slot(hist, tok))
        if st.cfg.gist_timing == "seal" and (hist + 1) % K == 0 and self._side_store_room(st):
            # the block completes with this token: its gist runs right after it, attending
            # to the block and the past only, then moves to the side store
            st.layout.pending.append(seal_gist_slot(hist // K))
            st.mirror_dirty = True  # vLLM must schedule the extra slot too

    def _side_store_room(self, st: MCRequest) -> bool:
        """A seal-time gist can be kept: a free side-store row, within the request's cap."""
        return bool(self._side_rows) and len(st.side_rows) < self.mc_options.side_store_per_request

    # ---- preemption / finish -----------------------------------------------------------

    def _release_retained_page(self) -> bool:
        """Under memory pressure, before vLLM preempts anyone: free the oldest page of the
        largest retained tier (expanding that block later recomputes its 32 tokens).
        False when no MegaContext request holds a retained page."""
        st = max((s for s in self.mc.values() if s.layout.retained),
                 key=lambda s: len(s.layout.retained), default=None)
        if st is None:
            return False
        block, page = st.layout.retained.popitem(last=False)
        st.retained_pos.pop(block, None)
        self.pages.free([page])
        st.stats.released_retained += 1
        return True

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> None:
        super()._preempt_request(request, *args, **kwargs)
        st = self.mc.get(request.request_id)
        if st is not None:
            freed = st.layout.reset_after_preemption(st.block_tokens)
            self.pages.free(freed)
            st.table_dirty = False
            st.mirror_dirty = True
            st.written.clear()
            st.retained_pos.clear()

    def _free_blocks(self, request: Any) -> None:
        super()._free_blocks(request)
        rid = request.request_id
        st = self.mc.pop(rid, None)
        if st is not None:
            # its side-store rows go back; queued ops on them must not touch the next owner's
            # (page copies/rotations are harmless: ops run before any forward)
            rows = set(st.side_rows.values())
            self._side_rows += rows
            self._mc_ops = [op for op in self._mc_ops
                            if not (isinstance(op, SaveGist | PlaceGist) and op.row in rows)]
            self._mc_new_configs.pop(rid, None)
            freed = st.layout.release_all()
            self.pages.free(freed)
            if st.session is not None:
                try:
                    self._release_session(st, ok=rid not in self.failures)
                except (OSError, StorageError) as e:  # the request is over: log, go on
                    logger.error("MegaContext session of %s: %s", rid, e)
            self.finished_summaries[request.request_id] = MCSummary(
                st.tree.num_tokens, st.wc.count_by_level(), st.wc.cost, st.cfg.w_max, st.stats,
                st.answer_wc,
            )
            while len(self.finished_summaries) > 4096:
                self.finished_summaries.popitem(last=False)
            self.metrics.publish(self, force=True)

    def queue_actions(self, request_id: str, actions: list[Action]) -> None:
        """Edits to apply before the request's next step; refused if they would break the
        working context (budget, tiling) when applied after those already queued."""
        st = self.mc[request_id]
        trial = st.wc.copy()
        for a in st.queued + actions:
            trial.apply(a)
        check_invariants(trial, top_level=st.cfg.top_level)
        st.queued += actions
