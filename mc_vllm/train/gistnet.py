"""Train GistNet for a frozen HF causal LM (``mc-vllm train-gistnet``).

Objective (the MegaContext GistNet loss): a window ``[prefix][span][horizon]`` is run
twice through the frozen model — with the span's raw tokens (teacher), and with the span
replaced by one gist vector in the input-embedding space (student). The loss is the KL
divergence from the teacher's next-token distributions to the student's over the ``H``
horizon tokens; ΔNLL@H (student NLL − teacher NLL on the true tokens, nats/token) is
reported. Positions are compact (the runtime default): the gist takes one position and the
horizon follows it. A LOD1 span is 32 tokens; a LOD2 span is 1024 tokens, gisted from the 32
LOD1 gists the same net makes (LOD2 is trained on LOD1 outputs, gradients through both).

The net starts as the exact mean-pool baseline (its correction is zero-initialised).
Checkpoints hold the net, the optimizer and the step; batches are drawn from (seed, step),
so a resumed run ends bit-identical to an uninterrupted one on the same device. A
checkpoint or net made for another base model (name, vocabulary, embedding size) is
refused with :class:`~mc_vllm.core.nets.NetConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.config import BLOCK_SIZE
from ..core.gistnet import GistNet, GistNetConfig, MeanPoolGist
from ..core.nets import NetConfigError
from .data import sample_windows, split_files, stdlib_files, token_stream

K = BLOCK_SIZE
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class GistTrainConfig:
    model: str  # HF model directory or hub id (weights must be local: no network here)
    out: str  # directory: checkpoint.pt while training, the saved net at the end
    levels: tuple[int, ...] = (1,)  # span levels trained, one batch of each per step
    steps: int = 300
    batch: int = 8
    lr: float = 3e-4
    horizon: int = 64  # H: tokens scored after the span
    prefix_blocks: int = 4  # raw blocks before the span
    seed: int = 0
    checkpoint_every: int = 50
    width: int = 128
    n_layers: int = 2
    n_heads: int = 4
    device: str = "cpu"
    dtype: str = "float32"  # the frozen model's dtype; GistNet trains in float32
    max_train_tokens: int | None = 2_000_000
    eval_windows: int = 32
    lod2_teacher: str = "raw"  # "lod1": LOD2 distils the LOD1 view (short-context models)
    data: list[str] = field(default_factory=list)  # text files; default: the stdlib's *.py

    def window(self, level: int) -> int:
        return self.prefix_blocks * K + K**level + self.horizon


def fingerprint(model: Any) -> dict[str, Any]:
    """What a net trained for ``model`` depends on: its name, vocabulary, embedding size."""
    cfg = model.config
    return {"base_model": Path(str(cfg.name_or_path)).name or str(cfg.name_or_path),
            "vocab_size": int(cfg.vocab_size),
            "embed_dim": int(model.get_input_embeddings().weight.shape[1])}


def load_frozen(cfg: GistTrainConfig) -> tuple[Any, Any]:
    """(model, tokenizer), the model frozen in eval mode on ``cfg.device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype))
    model.to(cfg.device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(cfg.model)


def gist_of(net: torch.nn.Module, span: torch.Tensor, level: int) -> torch.Tensor:
    """The gist of ``span`` [B, 32**level, D] -> [B, D] (LOD2 from the 32 LOD1 gists)."""
    b, n, d = span.shape
    if level == 1:
        return net(span)
    lod1 = gist_of(net, span.reshape(b * K, n // K, d), level - 1).view(b, K, d)
    return net(lod1)


def _logits_with_span(model: Any, e: torch.Tensor, p: int, s: int, horizon: int,
                      span: torch.Tensor | None) -> torch.Tensor:
    """Logits over the horizon of ``[prefix][span][horizon]`` with the span replaced by
    ``span`` ([B, n, D], n vectors; None drops it), compact positions: [B, H, V]."""
    parts = [e[:, :p]] + ([span.to(e.dtype)] if span is not None else [])
    parts.append(e[:, p + s : p + s + horizon - 1])
    x = torch.cat(parts, dim=1)
    pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
    return model(inputs_embeds=x, position_ids=pos).logits[:, -horizon:]


def window_losses(model: Any, net: torch.nn.Module | None, windows: torch.Tensor, level: int,
                  prefix: int, horizon: int, teacher: str = "raw",
                  teacher_net: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL, ΔNLL) per window, each [B], nats per horizon token. ``net=None`` drops the span
    (truncation: the horizon follows the prefix directly).

    ``teacher``: ``"raw"``, the span's tokens in context; ``"lod1"`` (LOD2 only), the span
    as its 32 LOD1 gists (the level below, made by ``teacher_net`` or else ``net``, without
    gradient): for a base model whose trained context is shorter than a 1024-token span."""
    p, s = prefix * K, K**level
    dev = next(model.parameters()).device
    windows = windows.to(dev)
    targets = windows[:, p + s : p + s + horizon]
    emb = model.get_input_embeddings()
    with torch.no_grad():
        e = emb(windows)
        lower = teacher_net if teacher_net is not None else net
        if teacher == "lod1" and level == 2 and lower is not None:
            b, d = e.shape[0], e.shape[-1]
            lod1 = gist_of(lower, e[:, p : p + s].float().reshape(b * K, K, d), 1).view(b, K, d)
            t_logits = _logits_with_span(model, e, p, s, horizon, lod1)
        elif teacher in ("raw", "lod1"):
            t_logits = model(input_ids=windows[:, : p + s + horizon]).logits[:, p + s - 1 : -1]
        else:
            raise ValueError(f"teacher={teacher!r}: expected 'raw' or 'lod1'")
    span = gist_of(net, e[:, p : p + s].float(), level)[:, None] if net is not None else None
    student = _logits_with_span(model, e, p, s, horizon, span)
    t_logp, s_logp = t_logits.float().log_softmax(-1), student.float().log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean(-1)
    nll = lambda lp: -lp.gather(-1, targets[..., None])[..., 0].mean(-1)  # noqa: E731
    return kl, nll(s_logp) - nll(t_logp)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def _net_config(cfg: GistTrainConfig, fp: dict[str, Any]) -> GistNetConfig:
    return GistNetConfig(embed_dim=fp["embed_dim"], base_model=fp["base_model"],
                         width=cfg.width, n_layers=cfg.n_layers, n_heads=cfg.n_heads)


def load_checkpoint(path: Path, fp: dict[str, Any], net_cfg: Any, what: str = "GistNet"
                    ) -> dict[str, Any]:
    """A net trainer's checkpoint, refused (NetConfigError) if made for another base model
    (``fp``: :func:`fingerprint`) or another net shape (``net_cfg``: a dataclass)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("fingerprint") != fp:
        raise NetConfigError(f"{path}: a checkpoint for base model {ck.get('fingerprint')}, "
                             f"not {fp}: train into another --out directory")
    if ck.get("net_config") != dataclasses.asdict(net_cfg):
        raise NetConfigError(f"{path}: {what} shape {ck.get('net_config')} differs from "
                             f"the requested {dataclasses.asdict(net_cfg)}")
    return ck


def evaluate(model: Any, net: torch.nn.Module, stream: Any, cfg: GistTrainConfig,
             level: int) -> dict[str, float]:
    """Mean ΔNLL@H and KL on fixed held-out windows, for the net, the mean-pool baseline and
    truncation (span dropped)."""
    windows = sample_windows(stream, cfg.window(level), cfg.eval_windows, seed=12345, step=level)
    out: dict[str, float] = {}
    mean = MeanPoolGist(net.config.embed_dim)
    with torch.no_grad():
        for name, n in (("gistnet", net), ("meanpool", mean), ("truncation", None)):
            kl, dnll = window_losses(model, n, windows, level, cfg.prefix_blocks, cfg.horizon,
                                     cfg.lod2_teacher, teacher_net=net)
            out[f"{name}_dnll"], out[f"{name}_kl"] = float(dnll.mean()), float(kl.mean())
    return out


def train_gistnet(cfg: GistTrainConfig, *, resume: bool = True, progress: bool = True,
                  stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume training of) a GistNet for ``cfg.model``; save it to ``cfg.out``.

    ``stop_after``: stop (after checkpointing) at that step, as an interrupted run would.
    Returns the held-out evaluation per level. Raises NetConfigError for a checkpoint of
    another base model or net shape, ValueError for too little training text."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model, tok = load_frozen(cfg)
    fp = fingerprint(model)
    net_cfg = _net_config(cfg, fp)
    net = GistNet(net_cfg).to(cfg.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ck_path, step = out / CHECKPOINT, 0
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path, fp, net_cfg)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    files = [Path(f) for f in cfg.data] or stdlib_files()
    train_files, held_files = split_files(files)
    stream = token_stream(tok, train_files, cfg.max_train_tokens)
    held = token_stream(tok, held_files or train_files, 200_000)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, desc="train-gistnet", disable=not progress)
    log = open(out / "train_log.jsonl", "a")
    while step < end:
        net.train()
        loss_total, row = 0.0, {"step": step + 1}
        for level in cfg.levels:
            w = sample_windows(stream, cfg.window(level), cfg.batch, cfg.seed + 7919 * level, step)
            kl, dnll = window_losses(model, net, w, level, cfg.prefix_blocks, cfg.horizon,
                                     cfg.lod2_teacher)
            loss = kl.mean()
            loss.backward()
            loss_total += float(loss.detach())
            row[f"kl_lod{level}"] = float(loss.detach())
            row[f"dnll_lod{level}"] = float(dnll.detach().mean())
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(kl=f"{loss_total:.4f}")
        if step % cfg.checkpoint_every == 0 or step == end:
            _atomic_save({"step": step, "net": net.state_dict(), "opt": opt.state_dict(),
                          "fingerprint": fp, "net_config": dataclasses.asdict(net_cfg)}, ck_path)
    bar.close()
    log.close()
    net.eval()
    if step >= cfg.steps:
        net.save(out)
    report = {f"lod{lv}": evaluate(model, net, held, cfg, lv) for lv in cfg.levels}
    (out / "eval.json").write_text(json.dumps({"step": step, **report}, indent=2) + "\n")
    return report
