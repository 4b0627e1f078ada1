"""Classification losses for the two-headed Conformer (CNN head + transformer head)."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from conformer.train.arguments import check_label_smoothing


def soft_target_cross_entropy(logits: Tensor, soft_target: Tensor) -> Tensor:
    """mean_b(sum_c(-t * log_softmax(logits))) for float targets [B, C] (mixup/cutmix, smoothed labels)."""
    log_probs = ops.log_softmax(logits.astype(ms.float32), axis=-1)
    return (-soft_target.astype(ms.float32) * log_probs).sum(axis=-1).mean()


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """float32 one-hot rows [B, C] for int class indices [B] (graph-mode safe)."""
    on, off = Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)
    return ops.one_hot(labels.astype(ms.int32), num_classes, on, off)


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross entropy for int class indices [B] or float soft targets [B, C] (graph-mode safe).

    Hard labels follow torch's label smoothing, (1 - s) * nll + s * mean_c(-log p), which equals the
    soft-target loss against (1 - s) * one_hot + s / C. Soft targets are used as given (mixup already
    smooths them).
    """
    if target.ndim == 1:
        num_classes = logits.shape[-1]
        soft = one_hot(target, num_classes) * (1.0 - label_smoothing) + label_smoothing / num_classes
        return soft_target_cross_entropy(logits, soft)
    if target.ndim == 2:
        return soft_target_cross_entropy(logits, target)
    raise ValueError("cross_entropy: target must be class indices [B] (int) or soft targets [B, C] (float).")


class DualHeadLoss(nn.Cell):
    """0.5 * CE(conv_logits) + 0.5 * CE(trans_logits), the official Conformer weighting.

    construct(logits, target): `logits` is the network's (conv_logits, trans_logits) tuple; `target` is
    either int class indices [B] (label smoothing applies) or float soft targets [B, C] from mixup/cutmix.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def head_losses(self, logits: tuple[Tensor, Tensor], target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head losses (conv, trans), e.g. for logging."""
        if len(logits) != 2:
            raise ValueError("DualHeadLoss expects the network output (conv_logits, trans_logits).")
        return (cross_entropy(logits[0], target, self.label_smoothing),
                cross_entropy(logits[1], target, self.label_smoothing))

    def construct(self, logits: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        conv_loss, trans_loss = self.head_losses(logits, target)
        return 0.5 * conv_loss + 0.5 * trans_loss
