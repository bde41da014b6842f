"""Omniglot for few-shot classification, prepared as in Finn et al. (2017).

Omniglot (Lake et al., 2015) has 1623 handwritten characters from 50 alphabets,
each drawn once by 20 people. The official release is two zips:
``images_background.zip`` (964 characters) and ``images_evaluation.zip`` (659),
laid out as ``<split>/<Alphabet>/character<NN>/<XXXX>_<YY>.png`` where ``XXXX``
is the global character number (0001..1623) and ``YY`` the drawing (01..20).

Preprocessing (identical to ``data/omniglot_resized/resize_images.py`` and
``data_generator.py`` in Finn's code, github.com/cbfinn/maml):

* ``PIL.Image.open(png).resize((28, 28), resample=Image.LANCZOS)``. The PNGs are
  PIL mode ``"1"``, for which Pillow silently uses NEAREST whatever filter is
  asked for, so the 28x28 images stay strictly binary. We call PIL the same way
  and therefore get the same pixels.
* Inverted so that ink is bright: ink = 1.0, background = 0.0 (Finn:
  ``1.0 - image / 255``). About 8% of pixels are ink.

Canonical order: character ``c`` of the returned ``[1623, 20, 28, 28, 1]``
array is the global character id ``XXXX - 1`` (0..1622; 0..963 background,
964..1622 evaluation; the same numbering as the ``label`` of TFDS's public
``omniglot`` builder) and drawing ``d`` is ``YY - 1``.

Meta-splits (:func:`omniglot_splits`). The paper shuffles the 1623 characters,
meta-trains on the first 1200 and meta-tests on the remaining 423, and makes
rotations by multiples of 90 degrees new classes. Here the shuffle is

    perm = numpy.random.default_rng(seed).permutation(1623)   # seed=1 default

over the canonical character ids (Finn's code used ``random.seed(1);
random.shuffle(folders)`` over an ``os.listdir`` order, which is not portable,
so the exact character sets differ from his). ``perm[:1100]`` is ``train``,
``perm[1100:1200]`` is ``val`` (held out from the paper's 1200 meta-training
characters for model selection; ``train_on_val=True`` trains on all 1200 as the
paper did), ``perm[1200:]`` is ``test`` (423). Every character is then expanded
into 4 classes, rotations by 0/90/180/270 degrees (``numpy.rot90``, counter
clockwise), class ``4 * i + k`` being character ``i`` of the split rotated by
``k * 90`` degrees: 4400 / 400 / 1692 classes.

Sources, in order (:func:`load_omniglot`): the ``data_dir`` argument, the
environment variable ``MAML_TF_OMNIGLOT_DIR`` (a folder holding the two zips),
and finally TFDS's public ``omniglot`` builder, which downloads (needs a
network). With a local folder, ``source='tfds'`` (default) prepares the
``MamlTfOmniglot`` TFDS builder (name ``maml_tf_omniglot``) once into a TFDS
data dir (``tfds_dir``, default ``~/tensorflow_datasets``) and reads the
cache afterwards; ``source='zip'`` decodes all 32,460 images from the zips
directly into numpy every time (no cache written).

Example:
  >>> from maml_tf.tasks import omniglot
  >>> images = omniglot.load_omniglot("../shared/data/omniglot")
  >>> images.shape, images.dtype
  ((1623, 20, 28, 28, 1), dtype('float32'))
  >>> splits = omniglot.omniglot_splits(images)
  >>> {k: v.shape[0] for k, v in splits.items()}
  {'train': 4400, 'val': 400, 'test': 1692}
"""

import io
import os
import re
import zipfile
import zlib
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from maml_tf.common.interrupts import UserFacingError

ENV_VAR = "MAML_TF_OMNIGLOT_DIR"
ZIP_FILES = ("images_background.zip", "images_evaluation.zip")
NUM_CHARACTERS = 1623
NUM_DRAWINGS = 20
IMAGE_SIZE = 28
DEFAULT_SEED = 1
NUM_TRAIN_CHARACTERS = 1100
NUM_VAL_CHARACTERS = 100
NUM_META_TRAIN_CHARACTERS = NUM_TRAIN_CHARACTERS + NUM_VAL_CHARACTERS  # 1200

_PNG_RE = re.compile(
    r"^(?:[^/]+/)?(?P<alphabet>[^/]+)/character(?P<char>\d+)/"
    r"(?P<cid>\d{4})_(?P<draw>\d{2})\.png$")

_WHAT_TO_DO = (
    f"Put the official Omniglot zips {ZIP_FILES[0]} and {ZIP_FILES[1]} in one "
    f"folder and pass it as data_dir (or set the environment variable "
    f"{ENV_VAR}, or the launchers' flag --data_dir), or call "
    f"load_omniglot() with neither to let TFDS download its public 'omniglot' "
    f"data set (needs a network).")


class DataUnavailableError(UserFacingError, RuntimeError):
  """No local Omniglot, and TFDS cannot download it (the message says which
  flag or variable to set)."""


class CorruptDataError(UserFacingError, ValueError):
  """An Omniglot zip that is not the official one or is damaged."""


class OmniglotZip(NamedTuple):
  """The contents of one Omniglot zip, ordered by global character id.

  Arguments:
    images: ``[N, 20, 28, 28, 1]`` uint8, ink 255, background 0.
    char_ids: ``[N]`` int64 global character ids (``XXXX - 1``), ascending.
    alphabets: ``N`` alphabet names.
  """

  images: np.ndarray
  char_ids: np.ndarray
  alphabets: List[str]


def preprocess_png(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
  """Decodes one Omniglot PNG and preprocesses it as Finn et al. did.

  Arguments:
    data: the PNG file's bytes (105x105, mode "1", white background).
    size: output side length.

  Returns:
    ``[size, size, 1]`` uint8 with ink 255 and background 0.

  Example:
    >>> img = preprocess_png(open("0709_01.png", "rb").read())  # doctest: +SKIP
    >>> img.shape
    (28, 28, 1)
  """
  with Image.open(io.BytesIO(data)) as im:
    return _preprocess_pil(im, size)


def _preprocess_pil(im: "Image.Image", size: int = IMAGE_SIZE) -> np.ndarray:
  # Exactly Finn's call; for mode "1" Pillow resamples with NEAREST.
  im = im.resize((size, size), resample=Image.LANCZOS)
  arr = np.asarray(im.convert("L"), dtype=np.uint8)
  return (255 - arr)[..., None]


def check_zip(path: str) -> None:
  """Raises a clear error if ``path`` is missing or not a readable zip.

  Runs ``zipfile.ZipFile.testzip`` (a CRC check of every member).

  Arguments:
    path: a ``.zip`` file.

  Raises:
    FileNotFoundError: the file does not exist.
    CorruptDataError: (a ``ValueError``) the file is not a valid zip or a
      member is corrupt.

  Example:
    >>> check_zip("../shared/data/omniglot/images_background.zip")
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Omniglot zip not found: {path}. {_WHAT_TO_DO}")
  try:
    with zipfile.ZipFile(path) as zf:
      bad = zf.testzip()
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise CorruptDataError(
        f"{path} is not a valid zip file ({e}); it is probably truncated or "
        f"corrupt: download it again. {_WHAT_TO_DO}") from e
  if bad is not None:
    raise CorruptDataError(
        f"{path} is corrupt: member {bad!r} fails its CRC check; download the "
        f"file again. {_WHAT_TO_DO}")


def _iter_zip_pngs(path: str):
  """Yields (alphabet, char_id, drawing, png_bytes) for each PNG, in zip order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Omniglot zip not found: {path}. {_WHAT_TO_DO}")
  try:
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        if info.is_dir() or not info.filename.endswith(".png"):
          continue
        m = _PNG_RE.match(info.filename)
        if m is None:
          raise CorruptDataError(
              f"{path}: unexpected member {info.filename!r}; expected "
              f"<split>/<Alphabet>/character<NN>/<XXXX>_<YY>.png")
        yield (m["alphabet"], int(m["cid"]) - 1, int(m["draw"]) - 1,
               zf.read(info))
  except (zipfile.BadZipFile, zlib.error, EOFError) as e:
    raise CorruptDataError(
        f"{path} is not a valid zip file or is corrupt ({e}): download it "
        f"again. {_WHAT_TO_DO}") from e


def read_omniglot_zip(path: str) -> OmniglotZip:
  """Decodes every drawing of one Omniglot zip into numpy, without TFDS.

  Arguments:
    path: an Omniglot zip (official, or any subset such as
      ``images_background_small1.zip``).

  Returns:
    An :class:`OmniglotZip`, characters in ascending global id.

  Raises:
    FileNotFoundError, ValueError: missing or corrupt zip, unexpected layout,
      a character without exactly 20 drawings; the message names the file.

  Example:
    >>> z = read_omniglot_zip("../shared/data/omniglot/images_evaluation.zip")
    >>> z.images.shape
    (659, 20, 28, 28, 1)
  """
  per_char: Dict[int, Dict[int, np.ndarray]] = {}
  alphabet_of: Dict[int, str] = {}
  for alphabet, cid, draw, data in _iter_zip_pngs(path):
    try:
      img = preprocess_png(data)
    except (OSError, ValueError) as e:
      raise CorruptDataError(
          f"{path}: cannot decode drawing {draw + 1} of character {cid + 1} "
          f"({alphabet}): {e}") from e
    per_char.setdefault(cid, {})[draw] = img
    if alphabet_of.setdefault(cid, alphabet) != alphabet:
      raise CorruptDataError(
          f"{path}: character {cid + 1} appears in two alphabets")
  if not per_char:
    raise CorruptDataError(f"{path} holds no Omniglot PNG files. {_WHAT_TO_DO}")
  ids = np.array(sorted(per_char), dtype=np.int64)
  images = np.zeros((len(ids), NUM_DRAWINGS, IMAGE_SIZE, IMAGE_SIZE, 1),
                    np.uint8)
  for i, cid in enumerate(ids):
    draws = per_char[cid]
    if sorted(draws) != list(range(NUM_DRAWINGS)):
      raise CorruptDataError(
          f"{path}: character {cid + 1} ({alphabet_of[cid]}) has drawings "
          f"{[d + 1 for d in sorted(draws)]}, expected 1..{NUM_DRAWINGS}")
    for d, img in draws.items():
      images[i, d] = img
  return OmniglotZip(images, ids, [alphabet_of[c] for c in ids])


# ---------------------------------------------------------------------------
# TFDS builder.

_builder_cls = None


def _import_tfds():
  """Imports tensorflow_datasets, working around a missing dependency.

  TFDS 4.9.10 lazily imports the pip package ``importlib_resources`` when it
  locates a builder's source file (``DatasetBuilder.code_path``) but does not
  declare it for Python >= 3.9, so every ``download_and_prepare`` fails with
  ``ModuleNotFoundError`` where that package is absent. The standard library's
  ``importlib.resources`` provides the one name used
  (``abc.Traversable``), so it stands in when the package is missing.
  """
  try:
    import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    import importlib.resources  # pylint: disable=g-import-not-at-top
    import importlib.resources.abc  # pylint: disable=g-import-not-at-top,unused-import
    import sys  # pylint: disable=g-import-not-at-top
    sys.modules.setdefault("importlib_resources", importlib.resources)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _make_builder_class():
  """Defines (once) and returns the TFDS builder class; imports TFDS lazily."""
  global _builder_cls
  if _builder_cls is not None:
    return _builder_cls
  tfds = _import_tfds()

  class MamlTfOmniglot(tfds.core.GeneratorBasedBuilder):
    """Omniglot at 28x28, Finn et al. preprocessing, from the local zips.

    Splits ``background`` (964 characters) and ``evaluation`` (659), one
    example per drawing with features ``image`` (28x28x1 uint8, ink 255),
    ``label`` (global character id 0..1622), ``alphabet`` and ``drawing``
    (0..19). Reads ``images_background.zip`` and ``images_evaluation.zip``
    from the TFDS manual dir; never downloads.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {ZIP_FILES[0]} and {ZIP_FILES[1]} (the official Omniglot "
        f"release, github.com/brendenlake/omniglot/tree/master/python) in the "
        f"manual dir, e.g. the folder named by {ENV_VAR}.")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="Omniglot resized to 28x28 as in Finn et al. (2017).",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(
                  shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8,
                  encoding_format="png"),
              "label": tfds.features.ClassLabel(num_classes=NUM_CHARACTERS),
              "alphabet": tfds.features.Text(),
              "drawing": np.int32,
          }),
          supervised_keys=("image", "label"),
          homepage="https://github.com/brendenlake/omniglot",
      )

    def _split_generators(self, dl_manager):
      manual_dir = os.fspath(dl_manager.manual_dir)
      paths = [os.path.join(manual_dir, f) for f in ZIP_FILES]
      for p in paths:
        check_zip(p)
      return {
          "background": self._generate_examples(paths[0]),
          "evaluation": self._generate_examples(paths[1]),
      }

    def _generate_examples(self, path):
      for alphabet, cid, draw, data in _iter_zip_pngs(path):
        yield f"{cid + 1:04d}_{draw + 1:02d}", {
            "image": preprocess_png(data),
            "label": cid,
            "alphabet": alphabet,
            "drawing": draw,
        }

  _builder_cls = MamlTfOmniglot
  return _builder_cls


def omniglot_builder(data_dir: Optional[str] = None):
  """Returns the ``maml_tf_omniglot`` TFDS builder (not yet prepared).

  Arguments:
    data_dir: TFDS data dir for the prepared cache (default
      ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).

  Example:
    >>> b = omniglot_builder("/tmp/tfds")
    >>> b.download_and_prepare(download_config=tfds.download.DownloadConfig(
    ...     manual_dir="../shared/data/omniglot"))  # doctest: +SKIP
  """
  return _make_builder_class()(data_dir=data_dir)


def __getattr__(name):
  # `omniglot.MamlTfOmniglot` without importing TFDS at module import time.
  if name == "MamlTfOmniglot":
    return _make_builder_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _examples_to_array(labels: np.ndarray, drawings: Optional[np.ndarray],
                       images: np.ndarray, what: str,
                       strict: bool) -> np.ndarray:
  """Scatters per-drawing examples into ``[num_chars, 20, 28, 28, 1]`` uint8."""
  labels = np.asarray(labels, np.int64)
  n = int(labels.max()) + 1 if labels.size else 0
  out = np.zeros((n, NUM_DRAWINGS, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
  if drawings is None:  # Keep the (deterministic) order within each character.
    drawings = np.zeros_like(labels)
    seen = np.zeros(n, np.int64)
    for i, c in enumerate(labels):
      drawings[i] = seen[c]
      seen[c] += 1
  drawings = np.asarray(drawings, np.int64)
  if (drawings < 0).any() or (drawings >= NUM_DRAWINGS).any():
    raise CorruptDataError(
        f"{what}: a character has more than {NUM_DRAWINGS} drawings")
  out[labels, drawings] = images
  counts = np.zeros((n, NUM_DRAWINGS), np.int64)
  np.add.at(counts, (labels, drawings), 1)
  if strict and (n != NUM_CHARACTERS or (counts != 1).any()):
    raise CorruptDataError(
        f"{what}: expected {NUM_CHARACTERS} characters x {NUM_DRAWINGS} "
        f"drawings, got {n} characters, {int((counts == 1).sum())} of "
        f"{counts.size} (character, drawing) slots filled. {_WHAT_TO_DO}")
  return out


def _load_from_zips(data_dir: str, strict: bool) -> np.ndarray:
  paths = [os.path.join(data_dir, f) for f in ZIP_FILES]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
        f"Omniglot zip(s) not found: {', '.join(missing)}. {_WHAT_TO_DO}")
  parts = [read_omniglot_zip(p) for p in paths]
  labels = np.concatenate([np.repeat(p.char_ids, NUM_DRAWINGS) for p in parts])
  drawings = np.concatenate(
      [np.tile(np.arange(NUM_DRAWINGS), len(p.char_ids)) for p in parts])
  images = np.concatenate(
      [p.images.reshape((-1,) + p.images.shape[2:]) for p in parts])
  return _examples_to_array(labels, drawings, images, data_dir, strict)


def _load_with_builder(data_dir: str, tfds_dir: Optional[str],
                       strict: bool) -> np.ndarray:
  tfds = _import_tfds()
  builder = omniglot_builder(tfds_dir)
  if not builder.is_prepared():  # Once; later calls only read the cache.
    for f in ZIP_FILES:
      check_zip(os.path.join(data_dir, f))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
  labels, drawings, images = [], [], []
  for split in ("background", "evaluation"):
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    labels.append(ex["label"])
    drawings.append(ex["drawing"])
    images.append(ex["image"])
  return _examples_to_array(np.concatenate(labels), np.concatenate(drawings),
                            np.concatenate(images), builder.data_dir, strict)


def public_tfds_to_array(labels: np.ndarray, images: np.ndarray,
                         strict: bool = True) -> np.ndarray:
  """Converts TFDS ``omniglot`` examples (105x105x3 RGB) to our format.

  TFDS's public builder keeps no drawing index, so drawings of a character are
  numbered in the (deterministic) order the examples come in.

  Arguments:
    labels: ``[M]`` global character ids (TFDS ``label``).
    images: ``[M, 105, 105, 3]`` uint8, white background.
    strict: require all 1623 x 20 drawings.

  Returns:
    ``[num_chars, 20, 28, 28, 1]`` uint8, ink 255.

  Example:
    >>> arr = public_tfds_to_array(np.array([0]), np.full((1, 105, 105, 3), 255,
    ...                            np.uint8), strict=False)
    >>> arr.shape
    (1, 20, 28, 28, 1)
  """
  images = np.asarray(images)
  small = np.empty((len(images), IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
  for i, img in enumerate(images):
    binary = img[..., 0] >= 128  # White background True, as the mode "1" PNGs.
    small[i] = _preprocess_pil(Image.fromarray(binary))
  return _examples_to_array(labels, None, small, "tfds omniglot", strict)


TFDS_HOST = ("storage.googleapis.com", 443)   # where TFDS downloads from


def _prepared_public_tfds(tfds_dir: Optional[str]) -> bool:
  root = tfds_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")
  return os.path.isdir(os.path.join(root, "omniglot"))


def _check_network(what: str) -> None:
  """Raises at once (not after TFDS's download retries) when offline."""
  import socket  # pylint: disable=g-import-not-at-top
  try:
    socket.create_connection(TFDS_HOST, timeout=5).close()
  except OSError as e:
    raise DataUnavailableError(
        f"No local Omniglot found (no data_dir argument, ${ENV_VAR} unset) "
        f"and {what} cannot be downloaded: {TFDS_HOST[0]} is unreachable "
        f"({type(e).__name__}: {e}). {_WHAT_TO_DO}") from None


def _load_public_tfds(tfds_dir: Optional[str], strict: bool) -> np.ndarray:
  if not _prepared_public_tfds(tfds_dir):
    _check_network("TFDS's 'omniglot' data set")
  tfds = _import_tfds()
  try:
    splits = tfds.load("omniglot", split=["train", "test"], data_dir=tfds_dir,
                       batch_size=-1)
  except Exception as e:  # Network errors come in many types.
    raise DataUnavailableError(
        f"No local Omniglot found (no data_dir argument, ${ENV_VAR} unset) "
        f"and TFDS could not load or download its 'omniglot' data set: "
        f"{type(e).__name__}: {e}. {_WHAT_TO_DO}") from e
  labels, images = [], []
  for ex in tfds.as_numpy(splits):
    labels.append(ex["label"])
    images.append(ex["image"])
  return public_tfds_to_array(np.concatenate(labels), np.concatenate(images),
                              strict)


def resolve_omniglot_dir(data_dir: Optional[str] = None) -> Optional[str]:
  """Returns ``data_dir``, else ``$MAML_TF_OMNIGLOT_DIR``, else ``None``.

  Arguments:
    data_dir: an explicit folder holding the two zips.

  Example:
    >>> resolve_omniglot_dir("/data/omniglot")
    '/data/omniglot'
  """
  if data_dir:
    return os.path.expanduser(os.fspath(data_dir))
  env = os.environ.get(ENV_VAR)
  return os.path.expanduser(env) if env else None


def load_omniglot(data_dir: Optional[str] = None,
                  tfds_dir: Optional[str] = None,
                  source: str = "tfds",
                  dtype=np.float32,
                  strict: bool = True) -> np.ndarray:
  """Loads all of Omniglot as ``[1623, 20, 28, 28, 1]``, canonical order.

  Arguments:
    data_dir: folder holding ``images_background.zip`` and
      ``images_evaluation.zip``; default ``$MAML_TF_OMNIGLOT_DIR``. With
      neither, falls back to ``tfds.load('omniglot')`` (downloads).
    tfds_dir: TFDS data dir for the prepared builder cache or the public
      download (default ``~/tensorflow_datasets``).
    source: with a local folder, ``'tfds'`` (default) prepares the
      ``maml_tf_omniglot`` builder into ``tfds_dir`` on first use and reads
      that cache afterwards; ``'zip'`` decodes the zips directly every time
      (nothing written).
    dtype: ``np.float32`` (ink 1.0, background 0.0) or ``np.uint8`` (ink 255;
      a quarter of the memory, convert with ``images / 255``).
    strict: require exactly 1623 characters x 20 drawings.

  Returns:
    numpy array ``[1623, 20, 28, 28, 1]``; ``[c, d]`` is drawing ``d`` of
    global character ``c``.

  Raises:
    FileNotFoundError / ValueError: a zip is missing or corrupt (named).
    DataUnavailableError: (a ``RuntimeError``) no local data and TFDS could
      not download.

  Example:
    >>> images = load_omniglot("../shared/data/omniglot")
    >>> float(images.mean())  # doctest: +SKIP
    0.08
  """
  if source not in ("zip", "tfds"):
    raise ValueError(f"source must be 'zip' or 'tfds', got {source!r}")
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float64, np.uint8):
    raise ValueError(f"dtype must be float32, float64 or uint8, got {dtype}")
  local = resolve_omniglot_dir(data_dir)
  if local is not None:
    if not os.path.isdir(local):
      raise FileNotFoundError(
          f"Omniglot folder not found: {local} (from "
          f"{'data_dir' if data_dir else '$' + ENV_VAR}). {_WHAT_TO_DO}")
    if source == "zip":
      images = _load_from_zips(local, strict)
    else:
      images = _load_with_builder(local, tfds_dir, strict)
  else:
    images = _load_public_tfds(tfds_dir, strict)
  if dtype == np.uint8:
    return images
  return images.astype(dtype) / dtype.type(255)


def omniglot_splits(images: np.ndarray,
                    seed: int = DEFAULT_SEED,
                    train_on_val: bool = False,
                    rotations: Sequence[int] = (0, 1, 2, 3),
                    num_train: int = NUM_TRAIN_CHARACTERS,
                    num_val: int = NUM_VAL_CHARACTERS) -> Dict[str, np.ndarray]:
  """Splits characters into meta-train/val/test classes as in the paper.

  ``perm = np.random.default_rng(seed).permutation(num_characters)``; the first
  ``num_train`` characters are ``train``, the next ``num_val`` are ``val``, the
  rest (423 for the full set) ``test``. Each character becomes
  ``len(rotations)`` classes, class ``R * i + j`` being character ``i`` rotated
  by ``rotations[j] * 90`` degrees counter-clockwise.

  Arguments:
    images: ``[num_characters, drawings, H, W, C]`` from :func:`load_omniglot`.
    seed: the shuffle seed.
    train_on_val: if True, ``train`` holds all ``num_train + num_val``
      meta-training characters (the paper's 1200); ``val`` is still returned.
    rotations: multiples of 90 degrees to make classes from; ``(0,)`` for none.
    num_train: meta-training characters that are not validation (1100).
    num_val: validation characters (100).

  Returns:
    dict ``{'train', 'val', 'test'}`` -> ``[n_classes, drawings, H, W, C]``,
    the same dtype as ``images`` (:func:`split_characters` gives the
    character ids behind the classes).

  Example:
    >>> s = omniglot_splits(load_omniglot("../shared/data/omniglot"))
    >>> s["train"].shape, s["val"].shape, s["test"].shape
    ((4400, 20, 28, 28, 1), (400, 20, 28, 28, 1), (1692, 20, 28, 28, 1))
  """
  images = np.asarray(images)
  if images.ndim != 5:
    raise ValueError(
        f"images must be [characters, drawings, H, W, C], got {images.shape}")
  rotations = tuple(int(r) % 4 for r in rotations)
  if not rotations or len(set(rotations)) != len(rotations):
    raise ValueError(f"rotations must be distinct multiples of 90 degrees, "
                     f"got {rotations}")
  if any(r % 2 for r in rotations) and images.shape[2] != images.shape[3]:
    raise ValueError("90-degree rotations need square images")
  chars = split_characters(images.shape[0], seed=seed,
                           train_on_val=train_on_val, num_train=num_train,
                           num_val=num_val)
  out = {}
  for name, ids in chars.items():
    rotated = np.stack(
        [np.rot90(images[ids], k=r, axes=(2, 3)) for r in rotations],
        axis=1)  # [chars, R, drawings, H, W, C]
    out[name] = np.ascontiguousarray(
        rotated.reshape((-1,) + rotated.shape[2:]))
  return out


def split_characters(num_characters: int = NUM_CHARACTERS,
                     seed: int = DEFAULT_SEED,
                     train_on_val: bool = False,
                     num_train: int = NUM_TRAIN_CHARACTERS,
                     num_val: int = NUM_VAL_CHARACTERS) -> Dict[str, np.ndarray]:
  """Returns the global character ids of each meta-split (before rotation).

  Arguments:
    num_characters: characters to split (1623).
    seed, train_on_val, num_train, num_val: as in :func:`omniglot_splits`.

  Returns:
    dict ``{'train', 'val', 'test'}`` -> int64 arrays of character ids, in the
    order their classes appear in :func:`omniglot_splits`.

  Example:
    >>> ids = split_characters()
    >>> [len(ids[k]) for k in ("train", "val", "test")]
    [1100, 100, 423]
  """
  n = int(num_characters)
  if num_train <= 0 or num_val < 0 or num_train + num_val >= n:
    raise ValueError(
        f"num_train={num_train} and num_val={num_val} must leave test "
        f"characters out of {n}")
  perm = np.random.default_rng(seed).permutation(n)
  end_train = num_train + (num_val if train_on_val else 0)
  return {
      "train": perm[:end_train],
      "val": perm[num_train:num_train + num_val],
      "test": perm[num_train + num_val:],
  }
