"""A seconds-long run of the default setup: one epoch on class-balanced 2,048 / 512 examples."""

from configs import default


def get_config():
  """Returns the default configuration shrunk for a smoke test."""
  config = default.get_config()
  config.num_epochs = 1
  config.num_train_examples = 2048
  config.num_test_examples = 512
  config.max_steps_per_call = 16
  config.eval_batch_size = 256
  return config
