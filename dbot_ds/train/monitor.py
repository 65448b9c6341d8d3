"""The online kNN monitor of `dbot-pretrain`: how good the student's features are while it trains.

When `eval.shards` is set, the trainer evaluates at step 0, every `eval.every_steps`, and at each stage end: the
student encoder before the swap (from the fp32 master weights kept as the stage's encoder), then the new teacher
once after it. Features and kNN are those of knn.py (mean-pooled patch tokens and cls, DINO's weighted kNN).

Precision, and what `dbot-eval` gives on the same weights:
- Stage end (`evaluate_encoder`): the stage's fp32 master weights in the timm VisionTransformer that dbot-export
  writes for them (`export.timm_encoder`), fp32 images, fp32 forward, no autocast, whatever optim.precision. This
  is exactly `dbot-eval knn --encoder RUN/stage_encoders/stageK` (or the final checkpoint's export, for the last
  stage): same images and split (knn.load_shares), same features (knn.gathered_features), same kNN
  (knn.knn_scores), so the same top-1/top-5 when the settings match: `--train` = eval.shards, `--query` =
  eval.query_shards or `--query-every` = eval.query_every, `--limit` = eval.max_images, `--k` = eval.k,
  `--temperature` = eval.temperature, and `--batch` = optim.micro_batch for forwards of the same shape (on the CPU
  the batch size does not change the features; GPU kernels may differ with it in the last bit). The trainer
  calls this with the fp32 state it also writes to stage_encoders/stageK.
- Step 0, every `eval.every_steps`, and the new teacher (`evaluate`): the weights the training forward uses, in
  the run's compute dtype (the bf16 module of a bf16 run; the teacher in teacher.precision), with images
  normalised to that dtype.
  In a bf16 run these differ from dbot-eval on a checkpoint's fp32 student by the bf16 rounding (a few queries
  either way); in an fp32 run they score the same fp32 weights in fp32.

Distributed: each rank decodes its share of the bank and the queries once (items j with j % world == rank, kept in
memory as uint8 centre crops), extracts their features with the same number of full batches as every other rank
(under ZeRO-3 the engine gathers each block's weights as in training, a collective), and the features are
all-gathered, so every rank computes the same scores. Training is not disturbed: no grad, eval mode (no drop
path) restored afterwards, and the RNG state restored (the forwards draw nothing, but a future layer might).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from dbot_ds.checkpoint.export import timm_encoder
from dbot_ds.config import Config, ConfigError
from dbot_ds.evaluate.knn import EvalDataError, Share, gathered_features, knn_scores, load_shares
from dbot_ds.model.vit import BeitEncoder


class KnnMonitor:
    """The labelled evaluation set of one rank, loaded and checked at construction (before the engine exists)."""

    def __init__(self, cfg: Config, shards: tuple[str, str], rank: int, world: int, device: torch.device,
                 dtype: torch.dtype):
        """`shards`: the resolved (bank, query or "") patterns of eval.shards / eval.query_shards
        (dataset.resolve_eval_shards)."""
        e = cfg.eval
        self.cfg, self.rank, self.world, self.device, self.dtype = cfg, rank, world, device, dtype
        self.batch = cfg.optim.micro_batch          # fits: training runs bigger forwards (teacher) at this size
        t0 = time.perf_counter()
        try:
            bank, query = shards
            shares = load_shares(bank, cfg.model.img_size, key="eval.shards", rank=rank, world=world,
                                 query_every=0 if query else e.query_every, limit=e.max_images)
            if query:
                shares["query"] = load_shares(query, cfg.model.img_size, key="eval.query_shards", rank=rank,
                                              world=world, limit=e.max_images)["bank"]
        except EvalDataError as err:
            raise ConfigError(str(err)) from err
        self.bank, self.query = shares["bank"], shares["query"]
        self._check(e)
        self.load_s = time.perf_counter() - t0

    def _check(self, e) -> None:
        where = "eval.query_shards" if e.query_shards else f"eval.query_every={e.query_every}"
        if len(self.query.labels) == 0:
            raise ConfigError(f"the kNN query set is empty ({where} over {e.query_shards or e.shards}); give "
                              "eval.query_shards, or more images in eval.shards")
        if len(self.bank.labels) < e.k:
            raise ConfigError(f"the kNN bank holds {len(self.bank.labels)} images, fewer than eval.k={e.k}; lower "
                              f"eval.k or give more labelled images in eval.shards")

    def describe(self) -> str:
        e = self.cfg.eval
        return (f"kNN monitor: bank {len(self.bank.labels)} and {len(self.query.labels)} query images "
                f"({e.query_shards or f'every {e.query_every}th of eval.shards'}), k={e.k}, T={e.temperature}, "
                f"every {e.every_steps or 'stage end'} steps; decoded in {self.load_s:.1f} s")

    def _features(self, forward: Callable[[torch.Tensor], torch.Tensor], share: Share,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return gathered_features(forward, share, self.batch, self.rank, self.world, dtype, self.device)

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None) -> dict:
        """kNN scores of `module`'s features ({"knn_top1_mean", ..., "seconds"}), identical on every rank.
        `forward`: images -> tokens [B, 1 + N, D]; default `module` itself. `dtype`: of the normalised images
        given to it; default the run's compute dtype. A collective."""
        forward = forward or module
        dtype = dtype or self.dtype
        was_training = module.training
        module.eval()
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                bank = self._features(forward, self.bank, dtype)
                query = self._features(forward, self.query, dtype)
            scores = knn_scores(bank, self.bank.labels.to(self.device), query, self.query.labels.to(self.device),
                                self.cfg.eval.k, self.cfg.eval.temperature)
        finally:
            module.train(was_training)
        self._check_agreement(scores)
        return {**scores, "seconds": round(time.perf_counter() - t0, 3)}

    def evaluate_encoder(self, state: dict[str, torch.Tensor]) -> dict:
        """The stage-end score of a stage's encoder: `state` holds its full fp32 master weights (our names, final
        norm included, as `engine.full_fp32_state(engine, "encoder.")` gives them on every rank). Scored in fp32,
        whatever optim.precision: fp32 images, fp32 forward, no autocast. The asymmetric student's encoder runs
        as the timm VisionTransformer of its export (`export.timm_encoder`), so the scores equal `dbot-eval knn`
        on `stage_encoders/stageK` with the same settings (module docstring); the symmetric student's as its
        BeitEncoder (dbot-export has no timm form for it). A collective."""
        m = self.cfg.model
        if m.student == "asymmetric":
            model = timm_encoder(state, m, m.depth, final_norm=True)
            forward = model.forward_features
        else:
            model = BeitEncoder(m)
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
            forward = model
        model = model.to(self.device, torch.float32).eval()
        return self.evaluate(model, forward, dtype=torch.float32)

    def _check_agreement(self, scores: dict[str, float]) -> None:
        """Every rank computed the scores from the same gathered features: a difference is a bug, not noise."""
        if self.world == 1 or not dist.is_initialized():
            return
        mine = torch.tensor(list(scores.values()), dtype=torch.float64, device=self.device)
        low, high = mine.clone(), mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"ranks disagree on the kNN scores ({low.tolist()} vs {high.tolist()}): the gathered "
                               "features differ between ranks")

