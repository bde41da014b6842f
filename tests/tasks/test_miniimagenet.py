"""Tests for maml_tf.tasks.miniimagenet on tiny images generated here."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from maml_tf.tasks import miniimagenet

# Split -> number of classes; every class gets N_PER_CLASS solid-colour jpgs.
SPLIT_CLASSES = {"train": 3, "val": 2, "test": 2}
N_PER_CLASS = 4
SIZE = 8


def _colour(split, c):
  base = {"train": 0, "val": 100, "test": 200}[split]
  return (base + 20 * c, 255 - 40 * c, 60 + 30 * c)


def _save_jpg(path, colour, size=(10, 12)):
  Image.new("RGB", size, colour).save(path, format="JPEG", quality=95)


@pytest.fixture
def csv_root(tmp_path):
  root = tmp_path / "mini_csv"
  (root / "images").mkdir(parents=True)
  for split, n_classes in SPLIT_CLASSES.items():
    with open(root / f"{split}.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["filename", "label"])
      for c in range(n_classes):
        wnid = f"n{split[:2]}{c:06d}"
        for i in range(N_PER_CLASS):
          name = f"{wnid}{i:08d}.jpg"
          _save_jpg(root / "images" / name, _colour(split, c))
          w.writerow([name, wnid])
  return root


@pytest.fixture
def folder_root(tmp_path):
  root = tmp_path / "mini_folders"
  for split, n_classes in SPLIT_CLASSES.items():
    for c in range(n_classes):
      d = root / split / f"n{split[:2]}{c:06d}"
      d.mkdir(parents=True)
      for i in range(N_PER_CLASS):
        _save_jpg(d / f"img{i:03d}.jpg", _colour(split, c))
  return root


def _check_loaded(data):
  assert set(data) == {"train", "val", "test"}
  for split, n_classes in SPLIT_CLASSES.items():
    arr = data[split]
    assert arr.shape == (n_classes, N_PER_CLASS, SIZE, SIZE, 3)
    assert arr.dtype == np.uint8
    for c in range(n_classes):  # Class order is preserved; JPEG is lossy.
      np.testing.assert_allclose(arr[c].reshape(-1, 3).mean(0),
                                 _colour(split, c), atol=4)


def test_csv_layout(csv_root):
  _check_loaded(miniimagenet.load_miniimagenet(str(csv_root), image_size=SIZE,
                                               num_threads=2))


def test_folder_layout(folder_root):
  _check_loaded(miniimagenet.load_miniimagenet(str(folder_root),
                                               image_size=SIZE, num_threads=1))
  index = miniimagenet.miniimagenet_index(str(folder_root), "val")
  assert [c for c, _ in index] == ["nva000000", "nva000001"]
  assert all(len(p) == N_PER_CLASS for _, p in index)


def test_default_size_env_var_and_to_float(csv_root, monkeypatch):
  monkeypatch.setenv(miniimagenet.ENV_VAR, str(csv_root))
  data = miniimagenet.load_miniimagenet(splits="val")
  assert list(data) == ["val"]
  assert data["val"].shape == (2, N_PER_CLASS, 84, 84, 3)
  f = miniimagenet.to_float(data["val"])
  assert f.dtype == np.float32 and 0.0 <= f.min() and f.max() <= 1.0
  np.testing.assert_allclose(f * 255, data["val"], atol=1e-3)


def test_no_location(monkeypatch):
  monkeypatch.delenv(miniimagenet.ENV_VAR, raising=False)
  with pytest.raises(FileNotFoundError, match=miniimagenet.ENV_VAR):
    miniimagenet.load_miniimagenet()


def test_missing_csv_and_split(csv_root):
  os.remove(csv_root / "test.csv")
  with pytest.raises(FileNotFoundError, match="test.csv"):
    miniimagenet.load_miniimagenet(str(csv_root), image_size=SIZE)
  # The other splits still load.
  data = miniimagenet.load_miniimagenet(str(csv_root), splits=("train",),
                                        image_size=SIZE)
  assert data["train"].shape[0] == 3


def test_missing_image_names_the_file(csv_root):
  victim = sorted(os.listdir(csv_root / "images"))[5]
  os.remove(csv_root / "images" / victim)
  with pytest.raises(FileNotFoundError, match=victim):
    miniimagenet.load_miniimagenet(str(csv_root), image_size=SIZE)


def test_corrupt_image_names_the_file(folder_root):
  victim = folder_root / "train" / "ntr000001" / "img002.jpg"
  victim.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  with pytest.raises(ValueError, match="img002.jpg"):
    miniimagenet.load_miniimagenet(str(folder_root), image_size=SIZE)


def test_bad_csv_header(csv_root):
  (csv_root / "val.csv").write_text("file,class\nx.jpg,n1\n")
  with pytest.raises(ValueError, match="val.csv.*filename,label"):
    miniimagenet.load_miniimagenet(str(csv_root), splits=("val",))


def test_unequal_classes_and_images_per_class(folder_root):
  os.remove(folder_root / "train" / "ntr000000" / "img000.jpg")
  with pytest.raises(ValueError, match="images_per_class"):
    miniimagenet.load_miniimagenet(str(folder_root), splits=("train",),
                                   image_size=SIZE)
  data = miniimagenet.load_miniimagenet(str(folder_root), splits=("train",),
                                        image_size=SIZE, images_per_class=3)
  assert data["train"].shape == (3, 3, SIZE, SIZE, 3)
  with pytest.raises(ValueError, match="fewer"):
    miniimagenet.load_miniimagenet(str(folder_root), splits=("train",),
                                   image_size=SIZE, images_per_class=4)


def test_cache_dir(csv_root, tmp_path):
  cache = tmp_path / "cache"
  first = miniimagenet.load_miniimagenet(str(csv_root), image_size=SIZE,
                                         cache_dir=str(cache))
  files = sorted(os.listdir(cache))
  assert len(files) == 3 and all(f.endswith(".npy") for f in files)
  # Second load reads the cache: it works even with the images gone.
  for f in os.listdir(csv_root / "images"):
    os.truncate(csv_root / "images" / f, 0)
  second = miniimagenet.load_miniimagenet(str(csv_root), image_size=SIZE,
                                          cache_dir=str(cache))
  for split in first:
    np.testing.assert_array_equal(first[split], second[split])
