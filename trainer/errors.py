"""What can stop a run, each with a message that is the whole story in one line."""


class TrainerError(Exception):
  """A run cannot start or continue; ``str(error)`` says why and what to do."""


class ConfigError(TrainerError, ValueError):
  """The configuration cannot be trained with (raised before any data is loaded)."""


class WorkdirError(TrainerError):
  """The workdir is unusable, in use by another run, or holds a different run."""


class CheckpointError(TrainerError):
  """No checkpoint in the workdir can be trusted."""


class DivergedError(TrainerError):
  """The training loss became non-finite; nothing of that epoch was saved."""


class Interrupted(TrainerError):
  """Ctrl-C or SIGTERM: says where the run stopped and how to resume it.

  ``exit_code`` follows the shell's convention for a signal: 128 + its number.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum
