"""The dBOT objectives: SmoothL1 on per-token standardised teacher features (the bootstrapped recipe) and the
negative cosine of the CLIP-teacher recipe; `objective.loss` picks one."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH_L1_BETA = 2.0
TARGET_EPS = 1e-6


def standardize_tokens(target: torch.Tensor) -> torch.Tensor:
    """[B, L, Dt] -> each token standardised over its channels: (t - mean) / sqrt(var + 1e-6), unbiased var
    as in the reference (torch.var's default), no affine."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / torch.sqrt(var + TARGET_EPS)


def dbot_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked feature-distillation loss, computed in fp32 whatever the inputs' dtype.

    pred, target: [B, 1 + N, Dt]; mask: [B, 1 + N], 1 where the token is in the loss (hidden patches and cls).
    Returns a scalar: SmoothL1(beta 2) per element, mean over channels, then mean over the masked tokens.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and teacher target {tuple(target.shape)} differ: "
                         "the predictor's width must equal the teacher's width and both see the same tokens")
    target = standardize_tokens(target.detach().float())
    per_token = F.smooth_l1_loss(pred.float(), target, reduction="none", beta=SMOOTH_L1_BETA).mean(dim=-1)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum()


COSINE_EPS = 1e-6


def neg_cosine_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The CLIP-teacher recipe's loss (reference `NegCosine`): 1 - the mean, over the tokens in the loss, of the
    cosine similarity between prediction and raw (not standardised) target; computed in fp32.

    pred, target: [B, 1 + N, Dt]; mask: [B, 1 + N], 1 where the token is in the loss (the hidden patches). The
    reference averages over all hidden tokens of the batch at once, which is this masked mean.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and teacher target {tuple(target.shape)} differ: "
                         "the predictor's width must equal the teacher's width and both see the same tokens")
    cos = F.cosine_similarity(pred.float(), target.detach().float(), dim=-1, eps=COSINE_EPS)
    mask = mask.float()
    return 1.0 - (cos * mask).sum() / mask.sum()


LOSSES = {"smooth_l1": dbot_loss, "neg_cosine": neg_cosine_loss}


def loss_fn(cfg):
    """The loss `objective.loss` names: f(pred, target, mask) -> scalar."""
    return LOSSES[cfg.objective.loss]
