"""Episode pipeline benchmark: meta-batches and episodes per second.

  python -m benchmarks.episodes --way 5 --shot 1 --query 15 --meta_batch 32
  python -m benchmarks.episodes --way 20 --batches 100
  python -m benchmarks.episodes --data random --classes 100 --batches 20

Prints one JSON line: the settings, meta-batches per second and episodes per
second of :func:`maml_tf.tasks.episodes.episode_dataset` (in-graph sampling,
parallel map, prefetch), timed over ``--batches`` meta-batches after
``--warmup`` untimed ones. ``--data omniglot`` (default) samples the
Omniglot ``train`` split (4400 rotated classes, float32), read from
``--data_dir`` or ``$MAML_TF_OMNIGLOT_DIR`` by decoding the zips (nothing
written); ``--data random`` samples random images of the same shape (no data
needed).
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top

from maml_tf.tasks import episodes  # pylint: disable=g-import-not-at-top


def throughput(class_images, way: int = 5, shot: int = 1, query: int = 15,
               meta_batch: int = 32, num_batches: int = 300,
               warmup: int = 20) -> dict:
  """Meta-batches/s and episodes/s of ``episodes.episode_dataset``."""
  ds = episodes.episode_dataset(class_images, way, shot, query, meta_batch,
                                seed=0)
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  rate = num_batches / (time.perf_counter() - start)
  return {"batches_per_s": rate, "episodes_per_s": rate * meta_batch}


def load_images(data: str, data_dir, classes: int) -> np.ndarray:
  """``[classes, 20, 28, 28, 1]`` float32: Omniglot's train split or random."""
  if data == "random":
    rng = np.random.default_rng(0)
    return rng.random((classes, 20, 28, 28, 1), dtype=np.float32)
  from maml_tf.tasks import omniglot  # pylint: disable=g-import-not-at-top
  images = omniglot.load_omniglot(data_dir, source="zip", dtype=np.float32)
  return omniglot.omniglot_splits(images)["train"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", choices=["omniglot", "random"],
                      default="omniglot")
  parser.add_argument("--data_dir", default=None,
                      help="Omniglot zips (default $MAML_TF_OMNIGLOT_DIR)")
  parser.add_argument("--classes", type=int, default=4400,
                      help="classes of --data random")
  parser.add_argument("--way", type=int, default=5)
  parser.add_argument("--shot", type=int, default=1)
  parser.add_argument("--query", type=int, default=15)
  parser.add_argument("--meta_batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=300,
                      help="timed meta-batches")
  parser.add_argument("--warmup", type=int, default=20,
                      help="untimed meta-batches first")
  args = parser.parse_args()
  images = load_images(args.data, args.data_dir, args.classes)
  result = {"data": args.data, "classes": int(images.shape[0]),
            "way": args.way, "shot": args.shot, "query": args.query,
            "meta_batch": args.meta_batch, "batches": args.batches}
  result.update(throughput(images, args.way, args.shot, args.query,
                           args.meta_batch, args.batches, args.warmup))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
