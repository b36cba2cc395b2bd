"""The MNIST trainer behind ``train.py``, as a library that imports without side effects.

Read top to bottom, the flow is: :mod:`trainer.input_pipeline` (MNIST from IDX files,
tensorflow-datasets or the offline subset; class-balanced subsets) -> :mod:`trainer.data` (MNIST
on the devices, epochs as index arrays) -> :mod:`trainer.model` (the MLP and its optimiser) ->
:mod:`trainer.step` (the compiled, pmapped training and evaluation calls) -> :mod:`trainer.loop`
(the run) -> the outputs, one module per job: :mod:`trainer.checkpoints`, :mod:`trainer.metrics`,
:mod:`trainer.console`, and :mod:`trainer.workdir` (which run a workdir holds, one run at a time);
:mod:`trainer.signals` turns Ctrl-C and SIGTERM into a clean stop.
"""

from trainer.errors import CheckpointError
from trainer.errors import ConfigError
from trainer.errors import DivergedError
from trainer.errors import Interrupted
from trainer.errors import TrainerError
from trainer.errors import WorkdirError
from trainer.loop import train_and_evaluate
from trainer.loop import validate_config

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DivergedError",
    "Interrupted",
    "TrainerError",
    "WorkdirError",
    "train_and_evaluate",
    "validate_config",
]
