"""Train LensNet for a frozen HF causal LM and its GistNet (``mc-vllm train-lensnet``).

Labels are counterfactual, from the frozen model (the MegaContext LensNet objective): a
working context is built as the runtime builds it at a prompt-end refocus point (the
prompt ingested in chunks, oldest entries collapsed to make room; sometimes one earlier
refocus round already applied), then for each labelled entry the NLL of the tokens that
follow (a task's answer, or the next ``horizon`` tokens of plain text) is measured with
that one entry changed:

* a gist: expanded (a LOD2 gist: expanded, then its best child expanded to raw tokens:
  a top-level gist needs two rounds to reach raw tokens, and its value is that of the best
  path). Utility ``u = NLL(now) − NLL(expanded)``, nats per target token.
* a sealed raw block: collapsed to its gist. Utility ``u = NLL(collapsed) − NLL(now)``: what
  keeping it raw is worth.

The target score is ``tanh(u / label_scale) − label_offset``: entries worth nothing fall
below ``−tau_collapse`` (collapse candidates, funding expansions), entries worth a fraction
of a nat rise above ``tau_expand``. The loss is the regression to that target plus a
pairwise ranking loss (the allocator acts on the order of scores: expansions highest first,
collapses lowest first) plus a listwise term (softmax cross-entropy putting the entry of
highest utility first when it is worth ``listwise_min`` nats or more: measured on the tiny
reader, it raised the held-out top-1 rate from ~0.33 to ~0.43, because the pairwise term
spreads its gradient over many near-tie pairs of worthless entries) plus a budget term
(the expansions the scores ask for, net of the collapses they offer, should fit the free
budget). Entries that cannot change (the open
block) carry no label.

Labelling is the expensive part (one batched forward of the frozen model per sample), so
a run first labels a fixed *pool* of ``pool`` training working contexts (kept in
``labels.pt`` beside the checkpoint, so an interrupted run resumes labelling where it
stopped), fits LensNet's input standardization on them, then takes ``steps`` optimizer
steps, each on ``samples`` contexts drawn from the pool.

Checkpoints, resume and base-model mismatch rules are those of ``train-gistnet``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.allocator import FocusAllocator, ingest, prompt_refocus_points
from ..core.config import BLOCK_SIZE, MCConfig
from ..core.gistnet import MeanPoolGist, load_gistnet
from ..core.lensnet import EntryFeatures, LensNet, LensNetConfig, entry_features
from ..core.nets import NetConfigError
from ..core.tree import MegaContextTree, children, node_end, node_start
from ..core.working_context import Action, WorkingContext
from ..reference import context_embeddings
from .data import split_files, stdlib_files, token_stream
from .gistnet import _atomic_save, fingerprint, load_checkpoint
from .tasks import KINDS, build_sequence, make_item

K = BLOCK_SIZE
CHECKPOINT = "checkpoint.pt"
LABELS = "labels.pt"


@dataclass(frozen=True)
class LensTrainConfig:
    model: str  # HF model directory (frozen base model)
    out: str  # directory: checkpoint.pt while training, the saved net at the end
    gistnet: str = ""  # trained GistNet dir for this model; "" = mean-pool gists
    w_max: int = 256
    history_x: tuple[float, float] = (2.0, 32.0)  # history length, in W_max, drawn uniformly
    task_share: float = 0.75  # the rest: plain text, the next ``horizon`` tokens as target
    horizon: int = 16
    pool: int = 1000  # labelled training working contexts
    steps: int = 2000  # optimizer steps over the pool
    samples: int = 8  # working contexts per step (drawn from the pool)
    lr: float = 1e-3
    label_scale: float = 0.5  # nats
    label_offset: float = 0.3
    rank_weight: float = 1.0
    listwise_weight: float = 1.0
    listwise_min: float = 0.5  # nats: a best entry worth less than this carries no listwise term
    listwise_temp: float = 5.0  # scores in [-1, 1] times this are the softmax logits
    budget_weight: float = 0.1
    max_labels: int = 16  # LOD1 entries labelled per sample (plus every other kind)
    max_children: int = 4  # children tried per LOD2 gist (plus the one holding the answer)
    seed: int = 0
    checkpoint_every: int = 100  # steps; labels are saved every ``checkpoint_every`` samples too
    width: int = 64
    n_latents: int = 8
    n_heads: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    max_train_tokens: int | None = 2_000_000
    eval_samples: int = 48
    data: list[str] = field(default_factory=list)


@dataclass
class Sample:
    """One labelled working context: the state LensNet scores and the counterfactuals."""

    tree: MegaContextTree
    wc: WorkingContext
    rest: list[int]  # prompt tokens after the refocus point (fed raw after the context)
    target: list[int]  # tokens whose NLL is measured
    utility: torch.Tensor  # [N] nats, NaN where unlabelled
    needle: tuple[int, int] | None = None  # token span of the task's fact, if any


@dataclass
class Labelled:
    """What training needs of a :class:`Sample`: LensNet's input features, the utilities,
    the budget, the index of the entry holding the fact (``-1``: none). Saved as plain
    tensors (``labels.pt``)."""

    features: EntryFeatures
    utility: torch.Tensor  # [N] nats, NaN where unlabelled
    free: int  # token-equivalents free in the working context
    w_max: int
    needle_entry: int = -1

    @classmethod
    def of(cls, s: Sample, n_cond: int) -> Labelled:
        hold = [i for i, e in enumerate(s.wc.entries)
                if s.needle is not None and e[0] > 0 and node_start(e) <= s.needle[0] < node_end(e)]
        return cls(entry_features(s.wc, s.tree, n_cond), s.utility, s.wc.free, s.wc.w_max,
                   hold[0] if hold else -1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.features), "utility": self.utility, "free": self.free,
                "w_max": self.w_max, "needle_entry": self.needle_entry}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Labelled:
        names = [f.name for f in dataclasses.fields(EntryFeatures)]
        return cls(EntryFeatures(**{k: d[k] for k in names}), d["utility"], d["free"],
                   d["w_max"], d["needle_entry"])


def _tree(model: Any, gist_fn: Any) -> MegaContextTree:
    emb = model.get_input_embeddings()
    return MegaContextTree(embed_dim=emb.weight.shape[1], embed_fn=emb, gist_fn=gist_fn,
                           gist_levels=2)


def runtime_state(tree: MegaContextTree, prompt: list[int], w_max: int, hold: int
                  ) -> WorkingContext:
    """The working context the runtimes hold at prompt-end refocus point ``hold`` (tokens
    ingested), before that refocus: chunks of ``w_max // 2``, oldest collapsed for room."""
    wc, alloc, chunk = WorkingContext([], 0, w_max), FocusAllocator(MCConfig(w_max=w_max)), w_max // 2
    for i in range(0, hold, chunk):
        ingest(wc, tree, alloc, prompt[i : min(i + chunk, hold)])
    return wc


@torch.no_grad()
def context_nll(model: Any, tree: MegaContextTree, wcs: list[WorkingContext], rest: list[int],
                target: list[int]) -> torch.Tensor:
    """Mean NLL (nats/token) of ``target`` after each working context followed by the raw
    ``rest`` tokens, compact positions: [len(wcs)]. Contexts of equal length run batched."""
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    tail = emb(torch.tensor(rest + target[:-1], device=dev))
    out = torch.empty(len(wcs))
    by_len: dict[int, list[int]] = {}
    mats = []
    for i, wc in enumerate(wcs):
        m = context_embeddings(wc, tree)
        mats.append(m)
        by_len.setdefault(len(m), []).append(i)
    tgt = torch.tensor(target, device=dev)
    for _, idx in by_len.items():
        x = torch.stack([torch.cat([mats[i].to(dev, tail.dtype), tail]) for i in idx])
        pos = torch.arange(x.shape[1], device=dev)[None].expand(len(idx), -1)
        logits = model(inputs_embeds=x, position_ids=pos).logits[:, -len(target):].float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), tgt[None].expand(len(idx), -1), reduction="none").mean(-1)
        out[idx] = nll.cpu()
    return out


def _variant(wc: WorkingContext, *actions: Action) -> WorkingContext:
    out = wc.copy()
    for a in actions:
        out.apply(a)
    return out


def label(model: Any, tree: MegaContextTree, wc: WorkingContext, rest: list[int],
          target: list[int], rng: random.Random, cfg: LensTrainConfig,
          needle: tuple[int, int] | None = None) -> torch.Tensor:
    """Counterfactual utilities (nats per target token) of the entries of ``wc``: [N],
    NaN for unlabelled entries. See the module docstring for the definitions."""
    n = len(wc.entries)
    util = torch.full((n,), float("nan"))
    touches = (lambda e: needle is not None and node_start(e) < needle[1]  # noqa: E731
               and node_end(e) > needle[0])
    lod1 = [i for i, e in enumerate(wc.entries) if e[0] == 1]
    keep = {i for i in lod1 if touches(wc.entries[i])}
    keep |= set(rng.sample(lod1, min(cfg.max_labels, len(lod1))))
    variants: list[WorkingContext] = [wc]
    owner: list[int] = [-1]
    for i, e in enumerate(wc.entries):
        if e[0] == 0 and node_end(e) <= tree.num_blocks * K and tree.has_node((1, e[1])):
            variants.append(_variant(wc, Action("collapse", (1, e[1]))))
            owner.append(i)
        elif e[0] == 1 and i in keep:
            variants.append(_variant(wc, Action("expand", e)))
            owner.append(i)
        elif e[0] == 2:
            kids = [c for c in children(e) if tree.has_node(c)]
            tried = {c for c in kids if touches(c)}
            tried |= set(rng.sample(kids, min(cfg.max_children, len(kids))))
            up = Action("expand", e)
            for c in sorted(tried):
                variants.append(_variant(wc, up, Action("expand", c)))
                owner.append(i)
    nll = context_nll(model, tree, variants, rest, target)
    base = float(nll[0])
    for j in range(1, len(variants)):
        i = owner[j]
        u = (float(nll[j]) - base) if wc.entries[i][0] == 0 else (base - float(nll[j]))
        util[i] = u if torch.isnan(util[i]) else max(float(util[i]), u)
    return util


class SampleSource:
    """Deterministic training / evaluation samples (task items with the needle at a random
    depth, or plain text), from (seed, step, index, split)."""

    def __init__(self, model: Any, tok: Any, gist_fn: Any, stream: np.ndarray,
                 cfg: LensTrainConfig) -> None:
        self.model, self.tok, self.gist_fn, self.stream, self.cfg = model, tok, gist_fn, stream, cfg

    def sample(self, step: int, index: int, split: str) -> Sample:
        cfg = self.cfg
        rng = random.Random(f"lens/{split}/{cfg.seed}/{step}/{index}")
        lo, hi = cfg.history_x
        length = int(cfg.w_max * rng.uniform(lo, hi))
        start = rng.randrange(0, len(self.stream) - length - cfg.horizon)
        filler = self.stream[start : start + length + cfg.horizon]
        needle = None
        if rng.random() < cfg.task_share:
            item = make_item(rng.choice(KINDS), rng.randrange(1 << 30), split)
            ids, a = build_sequence(self.tok, item, filler, length, rng.random(), rng)
            prompt, target = ids[:a], ids[a:]
            nd = self.tok.encode(item.needle, add_special_tokens=False)
            at = next((i for i in range(a) if ids[i : i + len(nd)] == nd), None)
            needle = (at, at + len(nd)) if at is not None else None
        else:
            prompt = [1] + filler[: length - 1].tolist()
            target = filler[length - 1 : length - 1 + cfg.horizon].tolist()
        # the state two rounds before the prompt's end (the pool's labels were made there)
        holds = prompt_refocus_points(len(prompt), cfg.w_max, 2) or [len(prompt)]
        hold = holds[0]
        tree = _tree(self.model, self.gist_fn)
        wc = runtime_state(tree, prompt, cfg.w_max, hold)
        top = [e for e in wc.entries if e[0] == 2]
        if top and rng.random() < 0.5:  # a state after one earlier round: a LOD2 expanded
            pick = [e for e in top if needle and node_start(e) <= needle[0] < node_end(e)]
            wc.apply(Action("expand", pick[0] if pick and rng.random() < 0.7 else rng.choice(top)))
        rest = prompt[hold:]
        util = label(self.model, tree, wc, rest, target, rng, cfg, needle)
        return Sample(tree, wc, rest, target, util, needle)


def lens_loss(net: LensNet, s: Labelled, cfg: LensTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Regression + ranking + listwise + budget loss of one labelled sample (see the module
    docstring); returns the loss and its terms as floats."""
    f = s.features
    dev = next(net.parameters()).device
    scores = net(f.vecs.to(dev), f.levels.to(dev), f.meta.to(dev), f.cond.to(dev))
    util = s.utility.to(dev)
    m = ~torch.isnan(util)
    if not m.any():
        return scores.sum() * 0.0, {"reg": 0.0, "rank": 0.0, "listwise": 0.0, "budget": 0.0}
    target = torch.tanh(util[m] / cfg.label_scale) - cfg.label_offset
    sc = scores[m]
    reg = torch.nn.functional.smooth_l1_loss(sc, target, beta=0.25)
    diff = target[:, None] - target[None, :]
    pairs = diff > 0.1
    rank = (torch.nn.functional.softplus(-(sc[:, None] - sc[None, :]) * 8.0)[pairs].mean()
            if pairs.any() else sc.sum() * 0.0)
    levels = f.levels.to(dev)
    cost = torch.where(levels == 0, torch.zeros_like(scores), torch.full_like(scores, K - 1.0))
    refund = torch.where(levels == 0, torch.full_like(scores, K - 1.0), torch.zeros_like(scores))
    asked = (torch.relu(scores - 0.2) * cost).sum() - (torch.relu(-scores - 0.2) * refund).sum()
    budget = torch.relu(asked - s.free) / s.w_max
    best = int(torch.where(m, util, torch.full_like(util, -torch.inf)).argmax())
    listwise = sc.sum() * 0.0
    if float(util[best]) >= cfg.listwise_min:
        listwise = torch.nn.functional.cross_entropy(
            sc[None] * cfg.listwise_temp, m[:best].sum()[None])
    loss = (reg + cfg.rank_weight * rank + cfg.listwise_weight * listwise
            + cfg.budget_weight * budget)
    return loss, {"reg": float(reg.detach()), "rank": float(rank.detach()),
                  "listwise": float(listwise.detach()), "budget": float(budget.detach())}


def needle_hit(scores: Any, s: Labelled) -> bool | None:
    """Whether the top-scored gist (``scores``: [N], any scorer's) holds the task's fact
    (None: no fact, or it is raw)."""
    if s.needle_entry < 0:
        return None
    gists = (s.features.levels > 0).nonzero()[:, 0].tolist()
    return max(gists, key=lambda i: float(scores[i])) == s.needle_entry


def _net_config(cfg: LensTrainConfig, fp: dict[str, Any]) -> LensNetConfig:
    return LensNetConfig(embed_dim=fp["embed_dim"], base_model=fp["base_model"],
                         width=cfg.width, n_latents=cfg.n_latents, n_heads=cfg.n_heads)


def evaluate(net: LensNet, source: SampleSource, cfg: LensTrainConfig) -> dict[str, float]:
    """Held-out samples: the loss terms, and how often the top-scored gist of a task sample
    holds its fact (``needle_top1``), for the net and for the untrained heuristic."""
    from ..core.lensnet import HeuristicScorer

    samples = [source.sample(0, i, "eval") for i in range(cfg.eval_samples)]
    labelled = [Labelled.of(s, net.config.n_cond) for s in samples]
    terms = {"reg": 0.0, "rank": 0.0, "listwise": 0.0, "budget": 0.0}
    with torch.no_grad():
        for s in labelled:
            _, t = lens_loss(net, s, cfg)
            for k in terms:
                terms[k] += t[k] / len(labelled)
    out = {f"eval_{k}": round(v, 4) for k, v in terms.items()}
    for name, scorer in (("lensnet", net), ("heuristic", HeuristicScorer())):
        hits = [h for h in (needle_hit(scorer.score(s.wc, s.tree), lab)
                            for s, lab in zip(samples, labelled, strict=True)) if h is not None]
        out[f"{name}_needle_top1"] = round(sum(hits) / max(len(hits), 1), 3)
    out["eval_task_samples"] = len(hits)
    return out


LABEL_FIELDS = ("gistnet", "w_max", "history_x", "task_share", "horizon", "seed",
                "max_labels", "max_children", "max_train_tokens", "data")


def label_pool(source: SampleSource, cfg: LensTrainConfig, n_cond: int, path: Path,
               fp: dict[str, Any], *, resume: bool, progress: bool) -> list[Labelled]:
    """The ``cfg.pool`` labelled training samples, sample ``i`` drawn as ``(i, 0, "train")``;
    continued from ``path`` if it holds labels made the same way (base model ``fp`` and the
    ``LABEL_FIELDS`` of ``cfg``), else NetConfigError."""
    from tqdm import tqdm

    key = {"fingerprint": fp, "n_cond": n_cond,
           **{k: json.loads(json.dumps(getattr(cfg, k))) for k in LABEL_FIELDS}}
    done: list[dict[str, Any]] = []
    if resume and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") != key:
            raise NetConfigError(f"{path}: labels made for {saved.get('key')}, not {key}: "
                                 f"train into another --out directory or pass --restart")
        done = saved["labels"][: cfg.pool]
    bar = tqdm(total=cfg.pool, initial=len(done), desc="label", disable=not progress)
    while len(done) < cfg.pool:
        done.append(Labelled.of(source.sample(len(done), 0, "train"), n_cond).to_dict())
        bar.update(1)
        if len(done) % cfg.checkpoint_every == 0 or len(done) == cfg.pool:
            _atomic_save({"key": key, "labels": done}, path)
    bar.close()
    return [Labelled.from_dict(d) for d in done]


def load_gist_fn(cfg: LensTrainConfig, fp: dict[str, Any]) -> torch.nn.Module:
    if not cfg.gistnet:
        return MeanPoolGist(fp["embed_dim"])
    return load_gistnet(cfg.gistnet, base_model=fp["base_model"],
                        embed_dim=fp["embed_dim"]).to(cfg.device)


def train_lensnet(cfg: LensTrainConfig, *, resume: bool = True, progress: bool = True,
                  stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume training of) a LensNet for ``cfg.model`` (and its GistNet); save it
    to ``cfg.out``. Returns the held-out evaluation. Raises NetConfigError for a checkpoint
    or GistNet of another base model or net shape."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype))
    model.to(cfg.device).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    fp = fingerprint(model)
    gist_fn = load_gist_fn(cfg, fp)
    net_cfg = _net_config(cfg, fp)
    net = LensNet(net_cfg).to(cfg.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ck_path, step, ck = out / CHECKPOINT, 0, None
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path, fp, net_cfg, "LensNet")
    files = [Path(f) for f in cfg.data] or stdlib_files()
    train_files, held_files = split_files(files)
    train = SampleSource(model, tok, gist_fn, token_stream(tok, train_files, cfg.max_train_tokens), cfg)
    held = SampleSource(model, tok, gist_fn, token_stream(tok, held_files or train_files, 300_000), cfg)
    pool = label_pool(train, cfg, net_cfg.n_cond, out / LABELS, fp, resume=resume,
                      progress=progress)
    if ck is not None:
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    else:
        net.fit_inputs([s.features for s in pool])
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, desc="train-lensnet", disable=not progress)
    log = open(out / "train_log.jsonl", "a")
    while step < end:
        net.train()
        row: dict[str, float] = {"step": step + 1}
        total = 0.0
        batch = random.Random(f"lens/batch/{cfg.seed}/{step}").sample(
            range(len(pool)), min(cfg.samples, len(pool)))
        for i in batch:
            loss, terms = lens_loss(net, pool[i], cfg)
            (loss / len(batch)).backward()
            total += float(loss.detach()) / len(batch)
            for k, v in terms.items():
                row[k] = row.get(k, 0.0) + v / len(batch)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        row["loss"] = total
        log.write(json.dumps(row) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if step % cfg.checkpoint_every == 0 or step == end:
            _atomic_save({"step": step, "net": net.state_dict(), "opt": opt.state_dict(),
                          "fingerprint": fp, "net_config": dataclasses.asdict(net_cfg)}, ck_path)
    bar.close()
    log.close()
    net.eval()
    if step >= cfg.steps:
        net.save(out)
    report = {"step": step, **evaluate(net, held, cfg)}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
