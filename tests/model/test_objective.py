"""The dBOT loss against a straightforward, independent implementation."""
import torch

from dbot_ds.model.objective import dbot_loss


def reference_loss(pred, target, mask):
    """Loops over samples and tokens; unbiased variance, eps inside the sqrt, SmoothL1 with beta 2."""
    total, count = 0.0, 0.0
    for b in range(pred.shape[0]):
        for t in range(pred.shape[1]):
            if mask[b, t] == 0:
                continue
            y = target[b, t].double()
            y = (y - y.mean()) / (y.var(unbiased=True) + 1e-6).sqrt()
            d = (pred[b, t].double() - y).abs()
            per = torch.where(d < 2.0, 0.5 * d**2 / 2.0, d - 1.0)
            total += per.mean().item()
            count += 1
    return total / count


def test_matches_reference():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 17, 8) * 2, torch.randn(3, 17, 8) * 5 + 1
    mask = (torch.rand(3, 17) > 0.5).float()
    mask[:, 0] = 1
    assert abs(dbot_loss(pred, target, mask).item() - reference_loss(pred, target, mask)) < 1e-5


def test_bf16_inputs_give_fp32_loss_and_only_masked_tokens_count():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=torch.float)
    loss = dbot_loss(pred.bfloat16(), target.bfloat16(), mask)
    assert loss.dtype == torch.float32
    pred2 = pred.clone()
    pred2[mask == 0] = 1e3                                   # visible tokens do not enter the loss
    assert torch.equal(dbot_loss(pred2, target, mask), dbot_loss(pred, target, mask))


def test_shape_mismatch_is_clear():
    import pytest
    with pytest.raises(ValueError, match="predictor's width"):
        dbot_loss(torch.zeros(1, 5, 8), torch.zeros(1, 5, 16), torch.ones(1, 5))
