"""Sources: ImageFolder scanning and errors, digits materialisation (atomic, idempotent), synthetic images, bad
image files found by name (skipped or raised) before MindSpore's decoder meets them."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import mindspore.dataset as ds
import numpy as np
import pytest
from PIL import Image

from conformer.data.generated import DigitsSource, SyntheticSource, write_image_folder
from conformer.data.sources import BadImageError, CheckedReader, FileReader, ImageFolderSource, file_problem
from conformer.errors import ConfigError


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


def test_links_into_loops_are_not_followed_and_each_image_counts_once(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """`train/0/up -> ..` (a loop), a second link to a folder already scanned and a linked file: each image once,
    one warning naming the links; a link to a folder outside the tree is followed as before."""
    for name in ("0", "1"):
        _image(tmp_path / "train" / name / "a.png", fmt="PNG")
        _image(tmp_path / "val" / name / "a.png", fmt="PNG")
    _image(tmp_path / "train" / "0" / "sub" / "b.png", fmt="PNG")
    _image(tmp_path / "elsewhere" / "c.png", fmt="PNG")
    (tmp_path / "train" / "0" / "up").symlink_to("..")  # train/0/up/0/up/0/... without end
    (tmp_path / "train" / "0" / "again").symlink_to("sub")
    (tmp_path / "train" / "0" / "z.png").symlink_to("a.png")
    (tmp_path / "train" / "1" / "outside").symlink_to(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(tmp_path)
    train = sorted((Path(p).relative_to(tmp_path).as_posix(), y) for p, y in source.train_samples)
    assert train == [("train/0/a.png", 0), ("train/0/again/b.png", 0), ("train/1/a.png", 1),  # sub/ after again/
                     ("train/1/outside/c.png", 1)]
    [warning] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 3 links" in warning
    for link in ("train/0/up", "train/0/sub", "train/0/z.png"):
        assert str(tmp_path / link) in warning


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
    code = ("import sys, json; from conformer.data.generated import DigitsSource; "
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


# ---------------------------------------------------------------------------------------------------- bad images
def write_corrupt_jpeg(path: Path) -> Path:
    """Random bytes under a JPEG name."""
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return path


def write_truncated(path: Path, image: Path, keep: float = 0.5) -> Path:
    """The first ``keep`` of a real image file, as a download cut short writes it."""
    data = image.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


@pytest.fixture()
def image_files(tmp_path: Path) -> dict[str, Path]:
    """A good JPEG and PNG (48x40), and the ways files go bad."""
    jpeg, png = tmp_path / "photo.jpg", tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(jpeg)
    Image.fromarray(pixels).save(png)
    return {"jpeg": jpeg, "png": png, "corrupt": write_corrupt_jpeg(tmp_path / "corrupt.jpg"),
            "truncated": write_truncated(tmp_path / "half.jpg", jpeg),
            "end cut": write_truncated(tmp_path / "end.jpg", jpeg, keep=0.98),  # MindSpore decodes it, grey tail
            "headers only": write_truncated(tmp_path / "head.jpg", jpeg, keep=0.3),  # MindSpore dies of SIGFPE
            "truncated png": write_truncated(tmp_path / "half.png", png),
            "empty": write_truncated(tmp_path / "empty.jpg", jpeg, keep=0.0), "missing": tmp_path / "missing.jpg"}


@pytest.mark.parametrize(("name", "reason"), [
    ("jpeg", None), ("png", None), ("corrupt", "not an image (unknown format"),
    ("truncated", "OSError: image file is truncated"), ("end cut", "OSError: image file is truncated"),
    ("headers only", "OSError: "), ("truncated png", "OSError: image file is truncated"), ("empty", "empty file"),
    ("missing", "cannot read the file: FileNotFoundError"),
])
def test_file_problem_names_what_is_wrong(image_files: dict[str, Path], name: str, reason: str | None) -> None:
    problem = file_problem(image_files[name])
    assert problem is None if reason is None else reason in str(problem), problem


@pytest.fixture()
def bad_folder(tmp_path: Path) -> tuple[ImageFolderSource, list[Path]]:
    """2 classes x 3 train JPEGs, of which train index 1 is corrupt and index 5 (the last) truncated."""
    root = write_image_folder(tmp_path / "ds", num_classes=2, train_per_class=3, val_per_class=1)
    first = root / "train" / "class_00" / "train_00_0000.jpg"
    bad = [write_corrupt_jpeg(root / "train" / "class_00" / "train_00_0001.jpg"),
           write_truncated(root / "train" / "class_01" / "train_01_0002.jpg", first)]
    return ImageFolderSource(root), bad


def _read(reader: CheckedReader, order: list[int]) -> list[tuple[bytes, int]]:
    """One pass of MindSpore's own reader over ``order``: two reader threads, no processes."""
    dataset = ds.GeneratorDataset(reader, ["image", "label"], sampler=order, num_parallel_workers=2,
                                  python_multiprocessing=False)
    return [(x.tobytes(), int(y)) for x, y in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)]


def _warnings_naming(caplog: pytest.LogCaptureFixture, path: Path) -> int:
    return sum(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_bad_files_are_skipped_once_by_name_and_replaced_by_the_next_good_one(
        bad_folder: tuple[ImageFolderSource, list[Path]], caplog: pytest.LogCaptureFixture) -> None:
    source, (corrupt, truncated) = bad_folder
    reader = CheckedReader(source.reader("train"), source.train_samples, "skip", "train")
    plain = source.reader("train")
    order = [5, 1, 3, 0, 2, 4]
    with caplog.at_level(logging.WARNING, logger="conformer.data.sources"):
        first = _read(reader, order)
        second = _read(reader, order)
    # index 1 -> 2, and the last index wraps around to 0: the same replacement every time
    expected = [(plain[i][0].tobytes(), int(plain[i][1])) for i in (0, 2, 3, 0, 2, 4)]
    assert first == second == expected
    assert reader.bad_images.keys() == {str(corrupt), str(truncated)}
    assert "not an image" in reader.bad_images[str(corrupt)]
    assert "truncated" in reader.bad_images[str(truncated)].lower()
    assert [_warnings_naming(caplog, path) for path in (corrupt, truncated)] == [1, 1]

    # a bad file is never read again, and a good file is decoded in its first epoch only
    corrupt.write_bytes(Path(source.train_samples[0][0]).read_bytes())
    write_truncated(Path(source.train_samples[3][0]), Path(source.train_samples[3][0]))
    third = _read(reader, order)
    assert third[0] == third[3] == expected[0] and third[1] == expected[1]
    assert third[2][0] == Path(source.train_samples[3][0]).read_bytes() != expected[2][0]
    assert len(reader.bad_images) == 2 and _warnings_naming(caplog, corrupt) == 1


def test_bad_file_under_error_fails_naming_it(bad_folder: tuple[ImageFolderSource, list[Path]]) -> None:
    source, (corrupt, _) = bad_folder
    reader = CheckedReader(source.reader("train"), source.train_samples, "error", "train")
    assert _read(reader, [0, 2])[1][1] == 0  # good files pass
    with pytest.raises(RuntimeError, match=re.escape(f"cannot decode image {corrupt}: not an image")) as caught:
        _read(reader, [0, 1, 2])
    assert "data.on_bad_image=skip" in str(caught.value)
    with pytest.raises(BadImageError, match=re.escape(str(corrupt))):
        reader[1]  # remembered as bad: still an error


def test_a_split_without_a_good_image_is_an_error(bad_folder: tuple[ImageFolderSource, list[Path]]) -> None:
    source, (corrupt, truncated) = bad_folder
    samples = [(str(corrupt), 0), (str(truncated), 1)]
    reader = CheckedReader(FileReader(samples), samples, "skip", "val")
    with pytest.raises(BadImageError, match="none of the 2 images of the val split can be decoded"):
        reader[0]
    with pytest.raises(ConfigError, match="data.on_bad_image='ignore'; choose one of skip, error"):
        CheckedReader(source.reader("val"), source.val_samples, "ignore")
