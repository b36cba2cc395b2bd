"""Tests for trainer/input_pipeline.py: IDX files and their errors, tfds (mocked), offline data."""

from __future__ import annotations

import dataclasses
import gzip
import os
import tempfile

import numpy as np
import pytest

from trainer import input_pipeline
from trainer.input_pipeline import DataFileError

from mnist_fixtures import idx_bytes
from mnist_fixtures import write_file
from mnist_fixtures import write_mnist_dir

IMAGES, LABELS = input_pipeline.IDX_FILES["train"]


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(name="mnist_dir")
def fixture_mnist_dir(tmp_path):
  return write_mnist_dir(str(tmp_path / "mnist"), num_train=70, num_test=30)


class TestReadIdx:

  @pytest.mark.parametrize("gz", [True, False])
  def test_reads_gz_and_raw(self, tmp_path, gz):
    folder = write_mnist_dir(str(tmp_path / "m"), num_train=20, num_test=10, gz=gz)
    data = input_pipeline.load_idx_dir(folder)
    assert data.train.images.shape == (20, 784) and data.train.images.dtype == np.uint8
    assert data.test.labels.shape == (10,) and data.test.labels.dtype == np.int32
    assert data.name == "mnist" and folder in data.source and not data.notice

  def test_gz_and_raw_give_the_same_arrays(self, tmp_path):
    a = input_pipeline.load_idx_dir(write_mnist_dir(str(tmp_path / "a"), num_train=9, num_test=3))
    b = input_pipeline.load_idx_dir(
        write_mnist_dir(str(tmp_path / "b"), num_train=9, num_test=3, gz=False))
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)

  def test_header_round_trip(self, tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = write_file(str(tmp_path / "x-idx3-ubyte"), idx_bytes(array, 2051))
    np.testing.assert_array_equal(input_pipeline.read_idx(path, magic=2051), array)


class TestBadFiles:
  """Every malformed input stops with an error naming the file and the problem."""

  def test_missing_file(self, mnist_dir):
    os.remove(os.path.join(mnist_dir, LABELS + ".gz"))
    with pytest.raises(DataFileError, match=rf"{LABELS}\[\.gz\]: missing; config.data_dir="):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_data_dir_not_a_directory(self, tmp_path):
    with pytest.raises(DataFileError, match=r"nope: config.data_dir is not a directory"):
      input_pipeline.load_idx_dir(str(tmp_path / "nope"))

  def test_truncated_data(self, mnist_dir):
    path = os.path.join(mnist_dir, IMAGES + ".gz")
    data = gzip.decompress(read_bytes(path))
    write_file(path, data[:-100])
    with pytest.raises(DataFileError, match=rf"{IMAGES}.gz: truncated: header says 70x28x28 = "
                       r"54880 bytes of data, file has 54780"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_truncated_header(self, mnist_dir):
    write_file(os.path.join(mnist_dir, LABELS + ".gz"), b"\x00\x00\x08")
    with pytest.raises(DataFileError, match=rf"{LABELS}.gz: truncated: 3 bytes, shorter than"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_trailing_bytes(self, mnist_dir):
    path = os.path.join(mnist_dir, LABELS + ".gz")
    write_file(path, gzip.decompress(read_bytes(path)) + b"\x01")
    with pytest.raises(DataFileError, match=rf"{LABELS}.gz: has trailing bytes"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_truncated_gzip_stream(self, mnist_dir):
    path = os.path.join(mnist_dir, IMAGES + ".gz")
    blob = read_bytes(path)
    with open(path, "wb") as f:
      f.write(blob[: len(blob) // 2])
    with pytest.raises(DataFileError, match=rf"{IMAGES}.gz: corrupt or truncated gzip stream"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_wrong_magic(self, mnist_dir):
    labels = np.zeros(70, np.uint8)
    write_file(os.path.join(mnist_dir, LABELS + ".gz"), idx_bytes(labels, 2051))
    with pytest.raises(DataFileError, match=rf"{LABELS}.gz: wrong magic number 2051 "
                       r"\(0x00000803\); an MNIST label file has 2049"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_images_and_labels_swapped(self, mnist_dir):
    images = os.path.join(mnist_dir, IMAGES + ".gz")
    labels = os.path.join(mnist_dir, LABELS + ".gz")
    os.rename(images, images + ".tmp")
    os.rename(labels, images)
    os.rename(images + ".tmp", labels)
    with pytest.raises(DataFileError, match=rf"{IMAGES}.gz: wrong magic number 2049"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_count_mismatch(self, mnist_dir):
    write_file(os.path.join(mnist_dir, LABELS + ".gz"), idx_bytes(np.zeros(69, np.uint8), 2049))
    with pytest.raises(DataFileError, match=rf"count mismatch: .*{IMAGES}.gz has 70 images but "
                       rf".*{LABELS}.gz has 69 labels"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_label_out_of_range(self, mnist_dir):
    labels = np.full(70, 3, np.uint8)
    labels[5] = 12
    write_file(os.path.join(mnist_dir, LABELS + ".gz"), idx_bytes(labels, 2049))
    with pytest.raises(DataFileError, match=rf"{LABELS}.gz: label 12 out of range 0..9"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_zero_examples(self, mnist_dir):
    write_file(os.path.join(mnist_dir, IMAGES + ".gz"),
               idx_bytes(np.zeros((0, 28, 28), np.uint8), 2051))
    write_file(os.path.join(mnist_dir, LABELS + ".gz"), idx_bytes(np.zeros(0, np.uint8), 2049))
    with pytest.raises(DataFileError, match=rf"{IMAGES}.gz: holds 0 examples"):
      input_pipeline.load_idx_dir(mnist_dir)

  def test_wrong_image_size(self, mnist_dir):
    images = np.zeros((70, 14, 14), np.uint8)
    write_file(os.path.join(mnist_dir, IMAGES + ".gz"), idx_bytes(images, 2051))
    with pytest.raises(DataFileError, match=rf"{IMAGES}.gz: images are 14x14, MNIST images "
                       r"are 28x28"):
      input_pipeline.load_idx_dir(mnist_dir)


class TestIdentity:

  def test_fingerprint_depends_on_the_examples_not_the_files(self, tmp_path):
    a = input_pipeline.load_idx_dir(write_mnist_dir(str(tmp_path / "a"), num_train=9, num_test=3))
    b = input_pipeline.load_idx_dir(
        write_mnist_dir(str(tmp_path / "b"), num_train=9, num_test=3, gz=False))
    c = input_pipeline.load_idx_dir(write_mnist_dir(str(tmp_path / "c"), num_train=8, num_test=3))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert c.fingerprint != a.fingerprint
    flipped = dataclasses.replace(a, train=input_pipeline.Split(a.train.images,
                                                                a.train.labels[::-1].copy()))
    assert flipped.fingerprint != a.fingerprint

  def test_offline_is_a_property_of_the_dataset(self, mnist_dir):
    assert not input_pipeline.load_idx_dir(mnist_dir).offline
    assert input_pipeline.load_offline_subset().offline


class TestOfflineSubset:

  def test_split_is_stratified_disjoint_and_complete(self):
    labels = np.repeat(np.arange(10), 500)
    train, test = input_pipeline.split_offline_subset(labels)
    assert len(train) == 4000 and len(test) == 1000
    np.testing.assert_array_equal(np.bincount(labels[test]), np.full(10, 100))
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))

  def test_real_digits_and_loud_notice(self):
    data = input_pipeline.load_offline_subset("no network (test)")
    assert (len(data.train), len(data.test)) == (4000, 1000)
    assert data.train.images.shape == (4000, 784) and data.train.images.max() == 255
    np.testing.assert_array_equal(np.bincount(data.train.labels), np.full(10, 400))
    assert data.name == input_pipeline.OFFLINE_DATASET
    for text in ("OFFLINE SUBSET", "NOT full MNIST", "--config.data_dir", "no network (test)"):
      assert text in data.notice

  def test_load_mnist_falls_back_when_tfds_is_unavailable(self, monkeypatch):
    monkeypatch.setattr(input_pipeline, "tfds_unavailable_reason", lambda _: "offline (test)")
    data = input_pipeline.load_mnist("", tfds_data_dir=None)
    assert data.name == input_pipeline.OFFLINE_DATASET and "offline (test)" in data.notice

  def test_data_dir_wins(self, mnist_dir, monkeypatch):
    monkeypatch.setattr(input_pipeline, "tfds_unavailable_reason", pytest.fail)
    assert len(input_pipeline.load_mnist(mnist_dir).train) == 70


class TestTfds:

  def test_data_source_path_with_mock_data(self, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(input_pipeline, "tfds_unavailable_reason", lambda _: None)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
      data = input_pipeline.load_mnist("")
    assert data.source == "tensorflow-datasets" and data.name == "mnist" and not data.notice
    assert data.train.images.shape == (12, 784) and data.train.images.dtype == np.uint8
    assert data.test.labels.dtype == np.int32 and data.test.labels.max() < 10

  def test_archive_path_without_tensorflow(self, mnist_dir, monkeypatch, tmp_path):
    """Without TensorFlow tfds cannot prepare MNIST; its downloaded archives are read instead."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_tensorflow(*args, **kwargs):
      raise ModuleNotFoundError("No module named 'tensorflow'")

    def fake_download(self, urls):  # What tfds' download manager returns: cached archive paths.
      return {k: os.path.join(mnist_dir, os.path.basename(u)) for k, u in urls.items()}

    monkeypatch.setattr(tfds, "data_source", no_tensorflow)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    data = input_pipeline.load_tfds(str(tmp_path / "tfds"))  # Nothing in the home folder.
    assert data.source == "tensorflow-datasets (IDX archives)"
    assert (len(data.train), len(data.test)) == (70, 30)

  def test_offline_detected_quickly(self, tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(input_pipeline, "_host_reachable", lambda url: False)
    reason = input_pipeline.tfds_unavailable_reason(str(tmp_path))
    assert reason.startswith("no network")
    monkeypatch.setattr(input_pipeline, "_host_reachable", lambda url: True)
    assert input_pipeline.tfds_unavailable_reason(str(tmp_path)) is None

  def test_no_temporary_folder_is_left_behind(self, tmp_path, monkeypatch):
    """tfds makes a ``tmp*tfds`` folder for dataset metadata and never deletes it."""
    pytest.importorskip("tensorflow_datasets")
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.setattr(input_pipeline, "_host_reachable", lambda url: False)
    assert input_pipeline.tfds_unavailable_reason(str(tmp_path / "tfds")).startswith("no network")
    assert os.listdir(system_tmp) == []
