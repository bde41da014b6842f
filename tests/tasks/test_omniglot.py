"""Tests for maml_tf.tasks.omniglot on the real Omniglot zips and synthetic ones."""

import io
import os
import pathlib
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from maml_tf.tasks import omniglot

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT.parent / "shared" / "data" / "omniglot"


def _find_omniglot_dir():
  for candidate in (os.environ.get(omniglot.ENV_VAR), DEFAULT_DIR):
    if candidate and all(
        os.path.isfile(os.path.join(candidate, f)) for f in omniglot.ZIP_FILES):
      return str(candidate)
  return None


@pytest.fixture(scope="session")
def omniglot_dir():
  d = _find_omniglot_dir()
  if d is None:
    pytest.skip(f"real Omniglot zips not found (set {omniglot.ENV_VAR} or put "
                f"them in {DEFAULT_DIR})")
  return d


@pytest.fixture(scope="session")
def omniglot_uint8(omniglot_dir):
  """All of Omniglot, decoded once per session straight from the zips."""
  start = time.perf_counter()
  images = omniglot.load_omniglot(omniglot_dir, source="zip", dtype=np.uint8)
  print(f"\nOmniglot decoded from zips in {time.perf_counter() - start:.1f} s")
  return images


def _png_bytes(array_bool):
  buf = io.BytesIO()
  Image.fromarray(array_bool).save(buf, format="PNG")  # bool -> mode "1"
  return buf.getvalue()


def _write_synthetic_zip(path, top, alphabets, first_id, rng):
  """A tiny Omniglot-layout zip: {alphabet: n_characters}, 20 drawings each."""
  cid = first_id
  with zipfile.ZipFile(path, "w") as zf:
    for alphabet, n_chars in alphabets.items():
      for c in range(n_chars):
        cid += 1
        for d in range(1, 21):
          img = rng.random((105, 105)) > 0.1  # ~10% ink (False)
          zf.writestr(f"{top}/{alphabet}/character{c + 1:02d}/{cid:04d}_{d:02d}"
                      f".png", _png_bytes(img))
  return cid


@pytest.fixture
def synthetic_dir(tmp_path):
  rng = np.random.default_rng(0)
  d = tmp_path / "omniglot"
  d.mkdir()
  last = _write_synthetic_zip(d / "images_background.zip", "images_background",
                              {"Alpha": 2, "Beta": 1}, 0, rng)
  _write_synthetic_zip(d / "images_evaluation.zip", "images_evaluation",
                       {"Gamma": 2}, last, rng)
  return d


# ---------------------------------------------------------------------------
# Real data.


def test_real_omniglot_shape_and_values(omniglot_uint8):
  images = omniglot_uint8
  assert images.shape == (1623, 20, 28, 28, 1)
  assert images.dtype == np.uint8
  assert set(np.unique(images)) <= {0, 255}  # Binary, as Finn's resize gives.
  ink = float((images > 0).mean())
  assert 0.06 < ink < 0.10, ink  # About 8% ink.
  per_image_ink = (images > 0).mean(axis=(2, 3, 4))
  assert per_image_ink.min() > 0  # No blank drawing.
  # The border is mostly background: ink is bright on a dark background.
  assert (images[:, :, 0] > 0).mean() < ink


def test_real_omniglot_canonical_order(omniglot_dir, omniglot_uint8):
  with zipfile.ZipFile(os.path.join(omniglot_dir, "images_background.zip")) as z:
    first_magi = z.read(
        "images_background/Alphabet_of_the_Magi/character01/0709_03.png")
  with zipfile.ZipFile(os.path.join(omniglot_dir, "images_evaluation.zip")) as z:
    last = z.read("images_evaluation/ULOG/character26/1623_20.png")
  np.testing.assert_array_equal(omniglot_uint8[708, 2],
                                omniglot.preprocess_png(first_magi))
  np.testing.assert_array_equal(omniglot_uint8[1622, 19],
                                omniglot.preprocess_png(last))
  # Finn: PIL LANCZOS resize of the mode "1" PNG, then ink = 1 - x / 255.
  with Image.open(io.BytesIO(last)) as im:
    finn = 1.0 - np.asarray(
        im.resize((28, 28), resample=Image.LANCZOS), np.float32)
  np.testing.assert_array_equal(omniglot_uint8[1622, 19, ..., 0] / 255, finn)


def test_real_omniglot_splits(omniglot_uint8):
  images = omniglot_uint8
  splits = omniglot.omniglot_splits(images)
  assert {k: v.shape for k, v in splits.items()} == {
      "train": (4400, 20, 28, 28, 1),
      "val": (400, 20, 28, 28, 1),
      "test": (1692, 20, 28, 28, 1)}
  ids = omniglot.split_characters(1623)
  assert [len(ids[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
  assert not set(ids["train"]) & set(ids["val"])
  assert not set(ids["train"]) & set(ids["test"])
  assert not set(ids["val"]) & set(ids["test"])
  assert set(np.concatenate(list(ids.values()))) == set(range(1623))
  # Class 4 * i + k is character ids[split][i] rotated by k * 90 degrees.
  for name in ("train", "test"):
    for i in (0, 7, len(ids[name]) - 1):
      for k in range(4):
        np.testing.assert_array_equal(
            splits[name][4 * i + k],
            np.rot90(images[ids[name][i]], k=k, axes=(1, 2)))
  # Same seed, same split; the paper's 1200 meta-training characters.
  again = omniglot.split_characters(1623, seed=omniglot.DEFAULT_SEED)
  np.testing.assert_array_equal(again["test"], ids["test"])
  all_train = omniglot.split_characters(1623, train_on_val=True)
  assert len(all_train["train"]) == 1200
  assert set(all_train["train"]) == set(ids["train"]) | set(ids["val"])
  np.testing.assert_array_equal(all_train["test"], ids["test"])
  other = omniglot.split_characters(1623, seed=2)
  assert set(other["test"]) != set(ids["test"])


def test_real_splits_train_on_val_and_no_rotation(omniglot_uint8):
  s = omniglot.omniglot_splits(omniglot_uint8[..., :1], train_on_val=True,
                               rotations=(0,))
  assert s["train"].shape[0] == 1200
  assert s["val"].shape[0] == 100
  assert s["test"].shape[0] == 423


def test_check_zip_on_real_files(omniglot_dir):
  for f in omniglot.ZIP_FILES:
    omniglot.check_zip(os.path.join(omniglot_dir, f))


@pytest.mark.skipif(not os.environ.get("MAML_TF_SLOW_TESTS"),
                    reason="full TFDS prepare (~10 s); set MAML_TF_SLOW_TESTS=1")
def test_real_tfds_builder_matches_zip_path(omniglot_dir, omniglot_uint8,
                                            tmp_path):
  start = time.perf_counter()
  images = omniglot.load_omniglot(omniglot_dir, tfds_dir=str(tmp_path),
                                  source="tfds", dtype=np.uint8)
  print(f"\nTFDS prepare + load: {time.perf_counter() - start:.1f} s")
  np.testing.assert_array_equal(images, omniglot_uint8)


# ---------------------------------------------------------------------------
# Errors.


def test_garbage_zip_names_the_file(tmp_path):
  bad = tmp_path / "images_background.zip"
  bad.write_bytes(b"this is not a zip file at all" * 100)
  (tmp_path / "images_evaluation.zip").write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(ValueError, match="images_background.zip") as err:
    omniglot.check_zip(str(bad))
  assert omniglot.ENV_VAR in str(err.value)
  with pytest.raises(ValueError, match="images_background.zip") as err:
    omniglot.load_omniglot(str(tmp_path), source="zip")
  from maml_tf.common import interrupts  # pylint: disable=g-import-not-at-top
  assert isinstance(err.value, interrupts.UserFacingError)  # launchers: 1 line
  with pytest.raises(ValueError, match="images_background.zip"):
    omniglot.load_omniglot(str(tmp_path), source="tfds",
                           tfds_dir=str(tmp_path / "tfds"))


def test_corrupt_member_fails_crc(tmp_path):
  path = tmp_path / "images_background.zip"
  payload = bytes(range(256)) * 8
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
    zf.writestr("images_background/A/character01/0001_01.png", payload)
  raw = bytearray(path.read_bytes())
  at = raw.find(payload)
  raw[at + 100] ^= 0xFF  # Flip one byte of the stored member.
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="images_background.zip.*0001_01.png"):
    omniglot.check_zip(str(path))


def test_missing_zip_names_the_file_and_remedy(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    omniglot.load_omniglot(str(tmp_path), source="zip")
  msg = str(err.value)
  assert "images_background.zip" in msg and "images_evaluation.zip" in msg
  # The flag the hint names is a real flag of the launcher.
  assert omniglot.ENV_VAR in msg and "--data_dir" in msg
  launcher = os.path.join(REPO_ROOT, "maml_tf", "launch", "classification.py")
  with open(launcher) as f:
    assert 'DEFINE_string(\n    "data_dir"' in f.read()
  with pytest.raises(FileNotFoundError, match="not found"):
    omniglot.load_omniglot(str(tmp_path / "nope"))


def test_no_location_falls_back_to_public_tfds(monkeypatch, tmp_path):
  monkeypatch.delenv(omniglot.ENV_VAR, raising=False)
  # The module omniglot loads TFDS through: patch its public ``load``.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_load(name, **kwargs):
    calls.append((name, kwargs))
    raise ConnectionError("no network")

  monkeypatch.setattr(tfds, "load", fake_load)
  monkeypatch.setattr(omniglot, "_check_network", lambda what: None)
  with pytest.raises(RuntimeError, match=omniglot.ENV_VAR):
    omniglot.load_omniglot(tfds_dir=str(tmp_path))
  assert calls and calls[0][0] == "omniglot"


def test_offline_without_data_fails_at_once_naming_the_flag(monkeypatch,
                                                           tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv(omniglot.ENV_VAR, raising=False)
  def offline(*args, **kwargs):
    raise OSError("Network is unreachable")
  monkeypatch.setattr(socket, "create_connection", offline)
  monkeypatch.setattr(tfds, "load", lambda *a, **k: pytest.fail("retried"))
  start = time.perf_counter()
  with pytest.raises(RuntimeError, match="unreachable.*--data_dir"):
    omniglot.load_omniglot(tfds_dir=str(tmp_path))
  assert time.perf_counter() - start < 5


def test_public_tfds_conversion_matches_zip_path(synthetic_dir):
  with zipfile.ZipFile(synthetic_dir / "images_evaluation.zip") as zf:
    names = sorted(n for n in zf.namelist() if n.endswith(".png"))
    pngs = [zf.read(n) for n in names]
  # What TFDS's public builder yields: 105x105x3 uint8 RGB, label = XXXX - 1.
  rgb = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB"))
                  for p in pngs])
  labels = np.array([int(n.split("/")[-1][:4]) - 1 for n in names])
  arr = omniglot.public_tfds_to_array(labels, rgb, strict=False)
  direct = omniglot.read_omniglot_zip(str(synthetic_dir /
                                          "images_evaluation.zip"))
  np.testing.assert_array_equal(arr[direct.char_ids], direct.images)


# ---------------------------------------------------------------------------
# Synthetic zips: zip reader, TFDS builder, options.


def test_synthetic_zip_reader(synthetic_dir):
  z = omniglot.read_omniglot_zip(str(synthetic_dir / "images_background.zip"))
  assert z.images.shape == (3, 20, 28, 28, 1)
  np.testing.assert_array_equal(z.char_ids, [0, 1, 2])
  assert z.alphabets == ["Alpha", "Alpha", "Beta"]
  with pytest.raises(ValueError, match="expected 1623 characters"):
    omniglot.load_omniglot(str(synthetic_dir), source="zip")
  images = omniglot.load_omniglot(str(synthetic_dir), source="zip",
                                  strict=False)
  assert images.shape == (5, 20, 28, 28, 1) and images.dtype == np.float32
  assert set(np.unique(images)) <= {0.0, 1.0}


def test_tfds_builder_on_synthetic_zips(synthetic_dir, tmp_path, monkeypatch):
  monkeypatch.setenv(omniglot.ENV_VAR, str(synthetic_dir))
  tfds_dir = tmp_path / "tfds"
  via_zip = omniglot.load_omniglot(source="zip", dtype=np.uint8, strict=False)
  via_tfds = omniglot.load_omniglot(tfds_dir=str(tfds_dir), source="tfds",
                                    dtype=np.uint8, strict=False)
  np.testing.assert_array_equal(via_tfds, via_zip)
  builder = omniglot.omniglot_builder(str(tfds_dir))
  assert builder.name == "maml_tf_omniglot"
  assert builder.info.splits["background"].num_examples == 60
  assert builder.info.splits["evaluation"].num_examples == 40
  assert builder.info.features["image"].shape == (28, 28, 1)
  ex = next(iter(builder.as_dataset(split="evaluation").take(1)))
  assert ex["alphabet"].numpy() == b"Gamma"
  assert 3 <= int(ex["label"]) <= 4 and 0 <= int(ex["drawing"]) < 20
  # Prepared once: a second load reads the cache even without the zips.
  for f in omniglot.ZIP_FILES:
    (synthetic_dir / f).unlink()
  again = omniglot.load_omniglot(tfds_dir=str(tfds_dir), source="tfds",
                                 dtype=np.uint8, strict=False)
  np.testing.assert_array_equal(again, via_zip)


def test_bad_arguments(synthetic_dir):
  with pytest.raises(ValueError, match="source"):
    omniglot.load_omniglot(str(synthetic_dir), source="web")
  images = np.zeros((10, 20, 4, 4, 1), np.uint8)
  with pytest.raises(ValueError, match="num_train"):
    omniglot.omniglot_splits(images, num_train=9, num_val=1)
  with pytest.raises(ValueError, match="rotations"):
    omniglot.omniglot_splits(images, num_train=5, num_val=2,
                             rotations=(0, 4))
  s = omniglot.omniglot_splits(images, num_train=5, num_val=2)
  assert [s[k].shape[0] for k in ("train", "val", "test")] == [20, 8, 12]
