"""What task=predict and the served MLflow model share: image decoding, the eval preprocessing and
softmax(conv + trans logits) batch by batch."""
from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from mindspore import Tensor

from conformer.data.transforms import EvalTransform


def decode_image(data: bytes, origin: str = "image") -> np.ndarray:
    """RGB uint8 HWC pixels of an encoded image (grey and palette images are converted); ValueError naming
    `origin` when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:
        raise ValueError(f"cannot read {origin}: {type(err).__name__}: {err}") from err


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an encoded image, read from its header without decoding it; None when PIL cannot tell."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
            return image.size
    except Exception:  # noqa: BLE001 (decode_image says why, naming the image)
        return None


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 HWC pixels of an image file."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return decode_image(data, f"image {path}")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def summed_logits(outputs: Tensor | tuple[Tensor, Tensor]) -> np.ndarray:
    """conv + trans logits (float32, as the network adds them) from both heads, or the prediction itself."""
    if isinstance(outputs, (tuple, list)):
        conv, trans = outputs
        return conv.asnumpy() + trans.asnumpy()
    return outputs.asnumpy()


def predict_probabilities(network: Callable, transform: EvalTransform, images: Iterable[np.ndarray],
                          batch_size: int) -> Iterator[np.ndarray]:
    """softmax(conv + trans) of RGB uint8 HWC images, batch by batch; short batches are padded so one graph (or a
    fixed-batch export) serves all. `network` returns both heads' logits or their sum."""
    ops = transform.operations(decode=False)
    images = iter(images)
    while chunk := list(islice(images, batch_size)):
        prepared = []
        for image in chunk:
            for op in ops:
                image = op(image)
            prepared.append(image)
        count = len(prepared)
        batch = np.zeros((batch_size, *prepared[0].shape), np.float32)
        batch[:count] = np.stack(prepared)
        yield softmax(summed_logits(network(Tensor(batch)))[:count])
