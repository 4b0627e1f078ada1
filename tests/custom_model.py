"""A network of the user's own, for the test that `model._target_` swaps it in: the two-head contract (a
constructor taking `num_classes`, a forward returning two logits tensors) and nothing else of the Conformer's."""
from __future__ import annotations

from mindspore import Tensor, nn


class TinyDualHead(nn.Cell):
    """A 3x3 conv stem, global average pooling and two linear heads; `width` is a key the Conformer does not have."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.SequentialCell(nn.Conv2d(3, width, 3, pad_mode="same"), nn.ReLU())
        self.head_a = nn.Dense(width, num_classes)
        self.head_b = nn.Dense(width, num_classes)

    def construct(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stem(images).mean(axis=(2, 3))
        return self.head_a(features), self.head_b(features)
