"""The online kNN monitor of `dbot-pretrain`: how good the student's features are while it trains.

When `eval.shards` is set, the trainer evaluates at step 0, every `eval.every_steps`, and at each stage end: the
student encoder before the swap (from the fp32 master weights kept as the stage's encoder), then the new teacher
once after it. Features and kNN are those of knn.py (mean-pooled patch tokens and cls, DINO's weighted kNN).

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

from .config import Config, ConfigError
from .knn import EvalDataError, Share, gathered_features, knn_scores, load_shares


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

    def _features(self, forward: Callable[[torch.Tensor], torch.Tensor], share: Share) -> dict[str, torch.Tensor]:
        return gathered_features(forward, share, self.batch, self.rank, self.world, self.dtype, self.device)

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """kNN scores of `module`'s features ({"knn_top1_mean", ..., "seconds"}), identical on every rank.
        `forward`: images -> tokens [B, 1 + N, D]; default `module` itself. A collective."""
        forward = forward or module
        was_training = module.training
        module.eval()
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                bank = self._features(forward, self.bank)
                query = self._features(forward, self.query)
            scores = knn_scores(bank, self.bank.labels.to(self.device), query, self.query.labels.to(self.device),
                                self.cfg.eval.k, self.cfg.eval.temperature)
        finally:
            module.train(was_training)
        self._check_agreement(scores)
        return {**{k: round(v, 3) for k, v in scores.items()}, "seconds": round(time.perf_counter() - t0, 3)}

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

