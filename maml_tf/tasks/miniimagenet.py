"""MiniImagenet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) splits.

100 ImageNet classes of 600 images each: 64 meta-train, 16 meta-validation and
20 meta-test classes. Two folder layouts are read:

* CSV layout (Ravi & Larochelle's release)::

    <root>/images/n0153282900000005.jpg ...
    <root>/train.csv  <root>/val.csv  <root>/test.csv    # header: filename,label

  Classes are ordered by first appearance in the CSV, images by CSV row.
* Folder layout (common re-packagings)::

    <root>/train/<wnid>/*.jpg   <root>/val/<wnid>/*.jpg   <root>/test/<wnid>/*.jpg

  Classes and files in sorted order.

If ``<root>/<split>.csv`` exists it wins, else ``<root>/<split>/`` is used.
Images are converted to RGB and, unless already ``image_size`` square (the
released files are 84x84), resized with PIL LANCZOS (aspect ratio not kept).

Memory: the arrays are uint8 (all 60,000 images at 84x84x3 are 1.27 GB; as
float32 they would be 5 GB). :func:`maml_tf.tasks.episodes.episode_dataset`
converts only the sampled images to float32 in ``[0, 1]``; :func:`to_float`
does it for a whole array. Decoding is parallel (``num_threads``); pass
``cache_dir`` to keep ``.npy`` copies, which later loads read instead of
decoding the JPEGs again.

The location comes from the ``root`` argument, else the environment variable
``MAML_TF_MINIIMAGENET_DIR``.

Example:
  >>> from maml_tf.tasks import miniimagenet
  >>> data = miniimagenet.load_miniimagenet("/data/miniimagenet")
  >>> data["train"].shape, data["train"].dtype
  ((64, 600, 84, 84, 3), dtype('uint8'))
"""

import concurrent.futures
import csv
import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

ENV_VAR = "MAML_TF_MINIIMAGENET_DIR"
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

_WHAT_TO_DO = (
    f"Pass the MiniImagenet root as `root` or set {ENV_VAR}; it must hold "
    f"either images/ with train.csv, val.csv, test.csv (Ravi & Larochelle) or "
    f"train/, val/, test/ folders of class subfolders.")


def resolve_miniimagenet_dir(root: Optional[str] = None) -> str:
  """Returns ``root``, else ``$MAML_TF_MINIIMAGENET_DIR``; raises if neither.

  Arguments:
    root: an explicit MiniImagenet folder.

  Example:
    >>> resolve_miniimagenet_dir("/data/miniimagenet")
    '/data/miniimagenet'
  """
  if root:
    root = os.path.expanduser(os.fspath(root))
    source = "root argument"
  else:
    env = os.environ.get(ENV_VAR)
    if not env:
      raise FileNotFoundError(
          f"No MiniImagenet location: no root argument and {ENV_VAR} is "
          f"unset. {_WHAT_TO_DO}")
    root, source = os.path.expanduser(env), f"${ENV_VAR}"
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"MiniImagenet folder not found: {root} (from {source}). "
        f"{_WHAT_TO_DO}")
  return root


def _index_csv(root: str, csv_path: str) -> List[Tuple[str, List[str]]]:
  image_dir = os.path.join(root, "images")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(
        f"{csv_path} exists but the image folder {image_dir} does not. "
        f"{_WHAT_TO_DO}")
  classes: Dict[str, List[str]] = {}
  with open(csv_path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["filename",
                                                              "label"]:
      raise ValueError(
          f"{csv_path}: expected the header 'filename,label', got {header}")
    for line, row in enumerate(reader, start=2):
      if not row or not "".join(row).strip():
        continue
      if len(row) < 2:
        raise ValueError(f"{csv_path}, line {line}: expected filename,label, "
                         f"got {row}")
      path = os.path.join(image_dir, row[0].strip())
      if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{csv_path}, line {line}: image file not found: {path}")
      classes.setdefault(row[1].strip(), []).append(path)
  if not classes:
    raise ValueError(f"{csv_path} lists no images")
  return list(classes.items())


def _index_folders(split_dir: str) -> List[Tuple[str, List[str]]]:
  out = []
  for name in sorted(os.listdir(split_dir)):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    files = sorted(f for f in os.listdir(class_dir)
                   if f.lower().endswith(_IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(f"class folder {class_dir} holds no image files")
    out.append((name, [os.path.join(class_dir, f) for f in files]))
  if not out:
    raise ValueError(f"{split_dir} holds no class subfolders. {_WHAT_TO_DO}")
  return out


def miniimagenet_index(root: Optional[str] = None,
                       split: str = "train") -> List[Tuple[str, List[str]]]:
  """Lists the classes of one split and their image files (nothing decoded).

  Arguments:
    root: MiniImagenet folder (default ``$MAML_TF_MINIIMAGENET_DIR``).
    split: ``'train'``, ``'val'`` or ``'test'``.

  Returns:
    list of ``(class_name, [image paths])`` in class order.

  Raises:
    FileNotFoundError: missing folder, CSV or image file (named).
    ValueError: malformed CSV or empty class.

  Example:
    >>> [c for c, _ in miniimagenet_index("/data/miniimagenet", "val")][:2]
    ['n01855672', 'n02091244']
  """
  root = resolve_miniimagenet_dir(root)
  csv_path = os.path.join(root, f"{split}.csv")
  split_dir = os.path.join(root, split)
  if os.path.isfile(csv_path):
    return _index_csv(root, csv_path)
  if os.path.isdir(split_dir):
    return _index_folders(split_dir)
  raise FileNotFoundError(
      f"MiniImagenet split {split!r} not found: neither {csv_path} nor "
      f"{split_dir}/ exists. {_WHAT_TO_DO}")


def load_image(path: str, image_size: int = IMAGE_SIZE) -> np.ndarray:
  """Decodes one image to ``[image_size, image_size, 3]`` uint8 RGB.

  Arguments:
    path: an image file.
    image_size: output side length (resized with LANCZOS if different).

  Raises:
    FileNotFoundError: missing file; ValueError: corrupt or unreadable image.

  Example:
    >>> load_image("/data/miniimagenet/images/n0153282900000005.jpg").shape
    (84, 84, 3)
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file not found: {path}")
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), resample=Image.LANCZOS)
      return np.asarray(im, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"corrupt or unreadable image {path}: {e}") from e


def _decode_split(classes, image_size, images_per_class, num_threads, where):
  counts = {name: len(paths) for name, paths in classes}
  if images_per_class is None:
    if len(set(counts.values())) != 1:
      raise ValueError(
          f"{where}: classes have different numbers of images "
          f"({min(counts.values())} to {max(counts.values())}); pass "
          f"images_per_class=N (launcher flag --images_per_class=N) to keep "
          f"the first N of each")
    n = next(iter(counts.values()))
  else:
    n = int(images_per_class)
    short = {c: k for c, k in counts.items() if k < n}
    if short:
      raise ValueError(
          f"{where}: images_per_class={n} but some classes have fewer: "
          f"{dict(list(short.items())[:5])}")
  out = np.empty((len(classes), n, image_size, image_size, 3), np.uint8)
  jobs = [(c, i, paths[i]) for c, (_, paths) in enumerate(classes)
          for i in range(n)]

  def work(job):
    c, i, path = job
    out[c, i] = load_image(path, image_size)

  if num_threads is None:
    num_threads = min(8, os.cpu_count() or 1)
  if num_threads <= 1:
    for job in jobs:
      work(job)
  else:  # PIL releases the GIL while decoding.
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for _ in pool.map(work, jobs, chunksize=64):
        pass
  return out


def load_miniimagenet(root: Optional[str] = None,
                      splits: Sequence[str] = SPLITS,
                      image_size: int = IMAGE_SIZE,
                      images_per_class: Optional[int] = None,
                      cache_dir: Optional[str] = None,
                      num_threads: Optional[int] = None
                      ) -> Dict[str, np.ndarray]:
  """Loads MiniImagenet splits as uint8 ``[n_classes, 600, 84, 84, 3]``.

  Arguments:
    root: MiniImagenet folder (default ``$MAML_TF_MINIIMAGENET_DIR``).
    splits: which splits to load.
    image_size: side length of the returned images.
    images_per_class: keep the first N images of each class (default: all,
      which must then be the same number for every class).
    cache_dir: if given, decoded splits are saved there as ``.npy`` (keyed
      by a hash of the file list and size) and loaded from there next time.
    num_threads: decoding threads (default ``min(8, cpu_count)``).

  Returns:
    dict split -> uint8 array ``[n_classes, n_per_class, image_size,
    image_size, 3]``; :func:`to_float` gives float32 in ``[0, 1]``.

  Raises:
    FileNotFoundError: missing root, CSV or image file (named).
    ValueError: malformed CSV, corrupt image (named), unequal classes.

  Example:
    >>> data = load_miniimagenet("/data/miniimagenet", splits=("val",))
    >>> data["val"].shape
    (16, 600, 84, 84, 3)
  """
  root = resolve_miniimagenet_dir(root)
  image_size = int(image_size)
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  if images_per_class is not None and int(images_per_class) <= 0:
    raise ValueError(
        f"images_per_class must be positive, got {images_per_class}")
  if isinstance(splits, str):
    splits = (splits,)
  out = {}
  for split in splits:
    classes = miniimagenet_index(root, split)
    cache_path = None
    if cache_dir is not None:
      h = hashlib.sha1()
      for name, paths in classes:
        h.update(name.encode())
        for p in paths:
          h.update(os.path.relpath(p, root).encode())
      h.update(f"{image_size}/{images_per_class}".encode())
      cache_path = os.path.join(
          os.path.expanduser(cache_dir),
          f"miniimagenet_{split}_{image_size}_{h.hexdigest()[:12]}.npy")
      if os.path.isfile(cache_path):
        out[split] = np.load(cache_path)
        continue
    arr = _decode_split(classes, image_size, images_per_class, num_threads,
                        f"{root} split {split!r}")
    if cache_path is not None:
      os.makedirs(os.path.dirname(cache_path), exist_ok=True)
      tmp = f"{cache_path}.{os.getpid()}.tmp.npy"
      np.save(tmp, arr)
      os.replace(tmp, cache_path)
    out[split] = arr
  return out


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in ``[0, 1]``.

  Arguments:
    images: uint8 array.

  Example:
    >>> to_float(np.array([0, 255], np.uint8))
    array([0., 1.], dtype=float32)
  """
  return np.asarray(images, np.float32) * np.float32(1.0 / 255.0)
