"""`dbot-eval linear`'s probe: MAE's linear-probe head (BatchNorm without affine, then Linear) trained with SGD on
fixed features, and its top-1 / top-5 accuracy. Features in, numbers out: cli.py extracts them and calls
`train_linear_probe`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WARMUP_FRACTION = 0.1          # linear probe: MAE warms up 10 of 90 epochs


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """MAE's schedule per step: linear warmup from 0 to base_lr over warmup_steps, then half-cycle cosine to 0."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """MAE's probe head: BatchNorm1d(D, affine=False, eps=1e-6) (standardises each feature, as MAE does, since
    pre-trained features are far from unit scale), then Linear(D, C) with trunc-normal(0.01) weights, zero bias."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    return head


def fit_linear_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 90, lr: float = 0.1,
                    batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> nn.Sequential:
    """Train `linear_head` on fixed features [N, D] (labels int64 [N]) on their device.

    SGD with momentum 0.9 where MAE uses LARS (LARS matters for MAE's 16384 batch; at a few hundred SGD does the
    same job), `lr_at` per step with WARMUP_FRACTION of the steps as warmup, cross-entropy, shuffled each epoch
    with the last partial batch dropped (a batch of 1 breaks batch norm). Seeded: init and order come from `seed`."""
    g = torch.Generator().manual_seed(seed)
    head = linear_head(feats.shape[1], num_classes, g).to(feats.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    batch = min(batch_size, len(feats))
    steps_per_epoch = max(1, len(feats) // batch)
    total = epochs * steps_per_epoch
    warmup, step = int(WARMUP_FRACTION * total), 0
    labels = labels.to(feats.device)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(feats), generator=g).to(feats.device)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, lr)
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


@torch.no_grad()
def probe_accuracy(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 4096) -> tuple[float, float]:
    """(top-1, top-5) accuracy in percent of `head` (eval mode) on features [M, D], labels int64 [M]."""
    top1 = top5 = 0
    for start in range(0, len(feats), chunk):
        logits = head(feats[start:start + chunk])                     # [m, C]
        y = labels[start:start + chunk].to(logits.device)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [m, <=5]
        hits = ranked == y[:, None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(1).sum())
    return 100.0 * top1 / len(feats), 100.0 * top5 / len(feats)


def train_linear_probe(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor,
                       query_labels: torch.Tensor, epochs: int = 90, lr: float = 0.1, batch_size: int = 256,
                       weight_decay: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Linear probe on fixed features: fit on bank [N, D] / bank_labels [N], score on query [M, D] / query_labels
    [M]. Returns {"linear_top1", "linear_top5"} in percent."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    head = fit_linear_head(bank, bank_labels, num_classes, epochs, lr, batch_size, weight_decay, seed)
    top1, top5 = probe_accuracy(head, query, query_labels)
    return {"linear_top1": top1, "linear_top5": top5}
