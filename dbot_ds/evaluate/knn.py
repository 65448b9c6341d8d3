"""Representation quality of an encoder: labelled evaluation images, pooled features, weighted kNN (as DINO).

Used by the online monitor inside `dbot-pretrain` (monitor.py) and by `dbot-eval`. Pure torch: no DeepSpeed.

- Images: every sample of a labelled webdataset pattern (a `cls` key), decoded once, shorter side resized to
  img_size / crop_pct and centre-cropped to img_size (the usual 0.875 evaluation crop), kept as uint8 in memory.
- Features: the encoder's final-norm tokens [B, 1 + N, D] pooled two ways, "mean" (patch tokens averaged) and
  "cls", each L2-normalised, in fp32.
- kNN: cosine similarity to the bank, the k nearest vote for their class with weight exp(sim / T)
  (DINO: k=20, T=0.07); top-1 / top-5 accuracy in percent.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms import v2

from dbot_ds.data.augment import _load_rgb, normalize
from dbot_ds.data.manifest import MANIFEST, expand_shards, shard_pattern
from dbot_ds.data.shard_reader import _raw_samples

POOLS = ("mean", "cls")
CROP_PCT = 0.875


class EvalDataError(ValueError):
    """An evaluation set that cannot be used; the message names the key and the fix."""


@dataclass
class LabelledImages:
    """images: uint8 [N, 3, S, S] centre crops; labels: int64 [N]."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | slice) -> "LabelledImages":
        return LabelledImages(self.images[index], self.labels[index])


def centre_crop(img: torch.Tensor, size: int, crop_pct: float = CROP_PCT) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size]: shorter side resized to size / crop_pct (bicubic), centre crop."""
    resize = int(math.floor(size / crop_pct))
    img = v2.functional.resize(img, resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.functional.center_crop(img, [size, size])


def _label(sample: dict, key: str) -> int:
    raw = sample[key]
    return int(raw.decode() if isinstance(raw, bytes) else raw)


def _shard_list(pattern: str) -> list[str]:
    """The shards of a pattern, or of a local folder of shards (its manifest.json order, else sorted .tar names)."""
    folder = Path(pattern)
    if folder.is_dir():
        if (folder / MANIFEST).exists():
            return expand_shards(shard_pattern(folder))
        return [str(p) for p in sorted(folder.glob("*.tar"))]
    return expand_shards(pattern)


def _labelled_samples(pattern: str, key: str, limit: int):
    """(label, encoded image bytes) of every sample of `pattern` (or a folder of shards) in shard order, at most
    `limit` if > 0."""
    try:
        shards = _shard_list(pattern)
    except (FileNotFoundError, ValueError) as e:
        raise EvalDataError(f"{key}={pattern}: {e}") from e
    n = 0
    for url in shards:
        for sample in _raw_samples(url):
            if "cls" not in sample:
                keys = sorted(k for k in sample if not k.startswith("__"))
                raise EvalDataError(
                    f"{key}={pattern}: sample {sample.get('__key__')} of {url} has no 'cls' label (keys {keys}); "
                    "kNN needs labelled shards, e.g. `dbot-shards imagenet` output or any shards with a cls key")
            data = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            if data is None:
                continue
            yield _label(sample, "cls"), data
            n += 1
            if limit and n >= limit:
                return


def _decode(data: bytes, img_size: int, crop_pct: float) -> torch.Tensor | None:
    try:
        return centre_crop(_load_rgb(data, img_size), img_size, crop_pct)
    except Exception:  # noqa: BLE001 - a corrupt image is skipped, as in training
        return None


def load_labelled(pattern: str, img_size: int, key: str = "eval.shards", limit: int = 0,
                  crop_pct: float = CROP_PCT) -> LabelledImages:
    """Every sample of `pattern` in shard order (at most `limit` if > 0), decoded and centre-cropped.

    Raises EvalDataError naming `key` when the pattern matches no shard, holds no samples, or its samples carry
    no `cls` label. Samples that cannot be decoded are skipped."""
    images, labels = [], []
    for label, data in _labelled_samples(pattern, key, limit):
        img = _decode(data, img_size, crop_pct)
        if img is not None:
            images.append(img)
            labels.append(label)
    if not labels:
        raise EvalDataError(f"{key}={pattern}: no readable labelled images; point it at labelled shards")
    return LabelledImages(torch.stack(images), torch.tensor(labels, dtype=torch.long))


@dataclass
class Share:
    """One rank's share of a labelled set of n items: the decoded items j with j % world == rank, in order
    (uint8 [ceil((n - rank) / world), 3, S, S]), and every item's label (int64 [n])."""
    images: torch.Tensor
    labels: torch.Tensor


def load_shares(pattern: str, img_size: int, *, key: str, query_every: int = 0, rank: int = 0, world: int = 1,
                limit: int = 0, crop_pct: float = CROP_PCT) -> dict[str, Share]:
    """{"bank": Share, "query": Share} of `pattern` for this rank, decoding only this rank's items. Sample i (in
    shard order) is a query when query_every > 0 and i % query_every == 0.
    Every rank reads every label, so all ranks know both sets' sizes and labels."""
    sets: dict[str, tuple[list, list]] = {"bank": ([], []), "query": ([], [])}
    i = 0
    for label, data in _labelled_samples(pattern, key, limit):
        name = "query" if query_every and i % query_every == 0 else "bank"
        images, labels = sets[name]
        if len(labels) % world == rank:
            img = _decode(data, img_size, crop_pct)
            # Only this rank decodes it, so it cannot be dropped (the others count it): a corrupt one stays as a
            # black image, a negligible vote in a set of thousands.
            images.append(torch.zeros(3, img_size, img_size, dtype=torch.uint8) if img is None else img)
        labels.append(label)
        i += 1
    empty = torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8)
    return {name: Share(torch.stack(images) if images else empty, torch.tensor(labels, dtype=torch.long))
            for name, (images, labels) in sets.items()}


def split_bank_query(data: LabelledImages, query_every: int) -> tuple[LabelledImages, LabelledImages]:
    """One labelled set as (bank, queries): sample i is a query when i % query_every == 0 (a fixed rule, so
    every run and every rank splits alike)."""
    is_query = torch.arange(len(data)) % query_every == 0
    return data.subset(~is_query), data.subset(is_query)


def pool(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """tokens [B, 1 + N, D] -> {"mean": [B, D], "cls": [B, D]}, fp32, L2-normalised."""
    tokens = tokens.float()
    return {"mean": F.normalize(tokens[:, 1:].mean(1), dim=-1), "cls": F.normalize(tokens[:, 0], dim=-1)}


@torch.no_grad()
def extract(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int, num_batches: int,
            dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Pooled features of uint8 `images` [n, 3, S, S] by `forward` (normalised images [B, 3, S, S] in `dtype` ->
    tokens [B, 1 + N, D]), run as exactly `num_batches` full forwards (padded with copies of image 0, or zeros
    for an empty slice, so every rank runs as many). Returns {"mean"/"cls": [n, D] fp32 on `device`}."""
    out: dict[str, list[torch.Tensor]] = {p: [] for p in POOLS}
    for b in range(num_batches):
        chunk = images[b * batch:(b + 1) * batch]
        real = len(chunk)
        if real < batch:       # a full batch on every rank: same shapes, same collectives
            filler = images[:1] if len(images) else torch.zeros(1, *images.shape[1:], dtype=torch.uint8)
            chunk = torch.cat([chunk, filler.expand(batch - real, -1, -1, -1)])
        feats = pool(forward(normalize(chunk.to(device, non_blocking=True), dtype)))
        for p in POOLS:
            out[p].append(feats[p][:real])
    return {p: torch.cat(v) for p, v in out.items()}


@torch.no_grad()
def weighted_knn(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024, leave_one_out: bool = False) -> tuple[float, float]:
    """DINO's weighted kNN. bank [N, D] and query [M, D] L2-normalised; labels int64. Returns (top-1, top-5)
    accuracy in percent. Each query's k most similar bank items vote for their class with exp(sim / T).

    leave_one_out: the queries are the bank itself (same items, same order) and each item's own entry is left
    out of its vote, so every labelled image is a query without a held-out split (a small set's only way to
    score all its images)."""
    if leave_one_out and (len(query) != len(bank) or not torch.equal(query_labels, bank_labels)):
        raise ValueError("leave_one_out needs the bank as its own query set (same items, same order)")
    if len(bank) - leave_one_out < k:
        raise EvalDataError(f"the kNN bank holds {len(bank) - leave_one_out} images (besides the query's own), "
                            f"fewer than k={k}; lower k or use more images" if leave_one_out else
                            f"the kNN bank holds {len(bank)} images, fewer than k={k}; lower k or use more images")
    num_classes = num_classes or int(max(bank_labels.max(), query_labels.max())) + 1
    bank, query = bank.float(), query.float()
    top1 = top5 = 0
    for start in range(0, len(query), chunk):
        q, y = query[start:start + chunk], query_labels[start:start + chunk].to(bank.device)
        sim = q @ bank.T                                                       # [m, N]
        if leave_one_out:                                                      # an item is not its own neighbour
            own = torch.arange(start, start + len(q), device=bank.device)
            sim[torch.arange(len(q), device=bank.device), own] = -float("inf")
        sim, idx = sim.topk(k, dim=1)                                          # [m, k]
        votes = torch.zeros(len(q), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels.to(bank.device)[idx], (sim / temperature).exp())
        ranked = votes.topk(min(5, num_classes), dim=1).indices                # [m, <=5]
        hits = ranked == y[:, None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(1).sum())
    return 100.0 * top1 / len(query), 100.0 * top5 / len(query)


def knn_scores(bank: dict[str, torch.Tensor], bank_labels: torch.Tensor, query: dict[str, torch.Tensor],
               query_labels: torch.Tensor, k: int, temperature: float, leave_one_out: bool = False
               ) -> dict[str, float]:
    """{"knn_top1_mean", "knn_top5_mean", "knn_top1_cls", "knn_top5_cls"} from pooled features of both sets, in
    percent rounded to 3 decimals (the kNN monitor's `eval` records and `dbot-eval knn` both report these).
    leave_one_out: the query set is the bank (see :func:`weighted_knn`)."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    out = {}
    for p in POOLS:
        t1, t5 = weighted_knn(bank[p], bank_labels, query[p], query_labels, k, temperature, num_classes,
                              leave_one_out=leave_one_out)
        out[f"knn_top1_{p}"], out[f"knn_top5_{p}"] = round(t1, 3), round(t5, 3)
    return out


def interleave(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Rank shares (rank r holds items j with j % world == r, in order) -> all n items in order."""
    out = parts[0].new_empty(n, *parts[0].shape[1:])
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


def gather_strided(own: torch.Tensor, n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of an [n, D] tensor -> the whole [n, D] on every rank (a collective)."""
    if world == 1 or not dist.is_initialized():
        return own
    per = math.ceil(n / world)
    padded = torch.zeros(per, *own.shape[1:], dtype=own.dtype, device=own.device)
    padded[:len(own)] = own
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)               # equal sizes: gloo and NCCL both need them
    return interleave([p[:len(range(r, n, world))] for r, p in enumerate(parts)], n)


def num_batches(n: int, world: int, batch: int) -> int:
    """Forwards every rank runs for a set of n images shared over `world` ranks (the same on every rank)."""
    return max(1, math.ceil(math.ceil(n / world) / batch))


def gathered_features(forward: Callable[[torch.Tensor], torch.Tensor], share: Share, batch: int, rank: int,
                      world: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Pooled features of a whole set from each rank's share: {"mean"/"cls": [n, D]} fp32 on `device`, in set
    order, on every rank (a collective). Every rank runs the same number of full batches."""
    n = len(share.labels)
    own = extract(forward, share.images, batch, num_batches(n, world, batch), dtype, device)
    return {p: gather_strided(own[p], n, rank, world) for p in POOLS}
