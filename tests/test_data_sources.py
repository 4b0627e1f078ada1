"""Sources: ImageFolder scanning and errors, digits materialisation (atomic, idempotent), synthetic images."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conformer.data.sources import DigitsSource, ImageFolderSource, SyntheticSource, write_image_folder


def _image(path: Path, colour: int = 0, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (colour, 0, 0)).save(path, format=fmt)


def test_class_index_follows_sorted_train_folders(tmp_path: Path) -> None:
    for name in ("zebra", "ant", "Moth"):
        _image(tmp_path / "train" / name / "a.JPEG")
    _image(tmp_path / "train" / "ant" / "nested" / "b.PnG", fmt="PNG")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    _image(tmp_path / "train" / "ant" / ".hidden.jpg")
    _image(tmp_path / "val" / "zebra" / "c.jpeg")

    source = ImageFolderSource(tmp_path)
    assert source.classes == ["Moth", "ant", "zebra"]
    assert source.num_classes == 3
    train = {Path(p).relative_to(tmp_path).as_posix(): y for p, y in source.train_samples}
    assert train == {"train/Moth/a.JPEG": 0, "train/ant/a.JPEG": 1, "train/ant/nested/b.PnG": 1,
                     "train/zebra/a.JPEG": 2}
    assert [(Path(p).name, y) for p, y in source.val_samples] == [("c.jpeg", 2)]
    assert (source.train_size, source.val_size) == (4, 1)
    image, label = source.reader("val")[0]
    assert image.dtype == np.uint8 and image[:2].tobytes() == b"\xff\xd8"  # raw JPEG bytes
    assert label.dtype == np.int32 and int(label) == 2


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "does not exist"),
        ({"train/a/x.jpg": 1}, "val split folder"),
        ({"train/.keep": 0, "val/a/x.jpg": 1}, "no class folders"),
        ({"train/a/x.jpg": 1, "train/b/readme.txt": 0, "val/a/y.jpg": 1}, r"without images .*\['b'\]"),
        ({"train/a/x.jpg": 1, "val/a/y.jpg": 1, "val/c/z.jpg": 1}, r"train split lacks: \['c'\]"),
    ],
)
def test_folder_errors_say_what_is_wrong(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    root = tmp_path / "ds"
    for rel, is_image in layout.items():
        target = root / rel
        if is_image:
            _image(target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        ImageFolderSource(root)


def test_digits_materialised_once_with_stratified_split(tmp_path: Path) -> None:
    root = tmp_path / "cache" / "digits"
    source = DigitsSource(root)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 1797
    assert (source.train_size, source.val_size) == (1437, 360)
    assert source.classes == [str(i) for i in range(10)]
    val_counts = np.bincount([y for _, y in source.val_samples], minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37  # stratified: ~20% of each ~180-image class
    assert not set(source.train_samples) & set(source.val_samples)
    from sklearn.datasets import load_digits

    digits = load_digits()
    first = root / ("val" if any(Path(p).name == "0000.png" for p, _ in source.val_samples) else "train")
    with Image.open(first / str(digits.target[0]) / "0000.png") as img:
        assert img.size == (8, 8) and img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), np.round(digits.images[0] * 255 / 16).astype(np.uint8))
    assert not [p for p in root.parent.iterdir() if p.name != "digits"]  # no temp folder left behind

    stamp = files[0].stat().st_mtime_ns
    again = DigitsSource(root)
    assert files[0].stat().st_mtime_ns == stamp
    assert again.train_samples == source.train_samples

    with pytest.raises(ValueError, match="delete"):
        DigitsSource(root, val_fraction=0.3)


def test_digits_concurrent_processes_agree(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    code = ("import sys, json; from conformer.data.sources import DigitsSource; "
            "s = DigitsSource(sys.argv[1]); print(json.dumps([s.train_size, s.val_size]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [json.loads(o) for o in outputs] == [[1437, 360], [1437, 360]]
    assert len(list(root.rglob("*.png"))) == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]


def test_digits_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a digits tree"):
        DigitsSource(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_synthetic_source_is_reproducible() -> None:
    source = SyntheticSource(num_train=6, num_val=3, num_classes=4, seed=1, height=20, width=30)
    assert (source.train_size, source.val_size, source.num_classes) == (6, 3, 4)
    image, label = source.reader("train")[2]
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8 and image.std() > 30
    twin = SyntheticSource(num_train=6, num_val=3, num_classes=4, seed=1, height=20, width=30)
    again, _ = twin.reader("train")[2]
    np.testing.assert_array_equal(image, again)
    assert int(label) == source.train_samples[2][1]
    assert not np.array_equal(image, source.reader("val")[2][0])
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSource(num_classes=0)


def test_write_image_folder_round_trips(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path, num_classes=2, train_per_class=3, val_per_class=1, size=(40, 30))
    source = ImageFolderSource(root)
    assert source.classes == ["class_00", "class_01"]
    assert (source.train_size, source.val_size) == (6, 2)
    with Image.open(source.train_samples[0][0]) as img:
        assert img.size == (40, 30)
