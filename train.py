r"""Trains the jaxce MNIST MLP: the command line of the :mod:`trainer` library.

  python train.py --config configs/default.py --workdir runs/mnist [--config.FIELD=VALUE ...]

A rerun of the same command resumes the run in --workdir from its newest intact checkpoint; a
rerun whose config or data would change the results is refused (--fresh deletes that run and
starts afresh). Every mistake ends in one line ``train.py: error: ...`` and a non-zero exit.
Ctrl-C or SIGTERM (a preemption) lets a checkpoint being saved finish, says where the run stopped
and exits with 130 or 143; the same command resumes it. See docs/training.md.

Multi-host: start one process per host with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID environment
variables, or --distributed to let JAX detect Slurm / Open MPI / Cloud TPU).
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import json
import logging as std_logging
import os
import signal
import sys

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from configs import default

FLAGS = flags.FLAGS


def config_help() -> str:
  """The --config help: every field with its default (configs/default.py) and meaning."""
  config = default.get_config()
  fields = "\n".join(f"  --config.{k}={config[k]!r}: {default.HELP[k]}" for k in config)
  return ("Training configuration file, e.g. configs/default.py (variants import it and "
          f"override). Override any field with --config.FIELD=VALUE; the fields and their "
          f"defaults:\n{fields}")


flags.DEFINE_string("workdir", None, "Directory for the run: checkpoints, metrics.jsonl, "
                    "TensorBoard, curves.png, run.json. A rerun resumes the run there.")
flags.DEFINE_bool("fresh", False, "Delete the run already in --workdir (checkpoints, metrics, "
                  "TensorBoard, run.json) and start afresh.")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT "
                    "(default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (default: $JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with JAX's cluster "
                  "auto-detection (Slurm, Open MPI, Cloud TPU) even without the flags above.")
config_flags.DEFINE_config_file("config", None, config_help(), lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str, code: int = 1):
  """Ends the process with one line on stderr."""
  print(f"train.py: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake reported as one line (exit 2)."""
  try:
    rest = FLAGS(argv)
  except SystemExit as e:  # absl exits with 1 after printing --help.
    sys.exit(0 if e.code == 1 and asks_for_help(argv) else e.code)
  except flags.Error as e:
    missing = [n for n in ("config", "workdir") if f"flag --{n}=None:" in str(e)]
    if missing:
      fail(f"--{missing[0]} is required (see --help)", 2)
    fail(str(e) if len(str(e).strip().splitlines()) == 1 else config_problem(argv, e), 2)
  except Exception as e:  # noqa: BLE001  (config file missing or broken, or an unknown field)
    fail(config_problem(argv, e), 2)
  if not isinstance(FLAGS.config, ml_collections.ConfigDict):  # It failed to load.
    fail(config_problem(argv, None), 2)
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; every option is a --flag (see --help)", 2)
  return rest


def asks_for_help(argv: list[str]) -> bool:
  return any(a in ("-?", "-h", "--help", "--helpshort", "--helpfull", "--helpxml")
             for a in argv[1:])


def config_problem(argv: list[str], error: Exception | None) -> str:
  """What is wrong with --config or a --config.FIELD override, in one line."""
  path = flag_value(argv, "config").split(":")[0]  # config_flags allows FILE:ARGUMENT.
  if not os.path.isfile(path):
    return f"--config={path}: no such file"
  try:
    fields = list(load_config(path))
  except Exception as e:  # noqa: BLE001
    return f"--config={path} cannot be loaded: {type(e).__name__}: {first_line(e)}"
  names = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
  for name in names:
    if name.split(".")[0] not in fields:
      close = difflib.get_close_matches(name, fields, n=1)
      hint = f" (did you mean --config.{close[0]}?)" if close else ""
      return f"--config.{name}: no such config field{hint}; see --help for the fields"
  return f"--config={path}: {type(error).__name__}: {first_line(error)}"


def flag_value(argv: list[str], name: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def load_config(path: str):
  """``get_config()`` of a config file (only to explain why config_flags failed)."""
  loader = importlib.machinery.SourceFileLoader("train_config", path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  loader.exec_module(module)
  return module.get_config()


def first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def init_distributed(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, force: bool) -> None:
  """``jax.distributed.initialize`` from flags, else the environment; a no-op for one process."""
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ.get
  address = coordinator_address or env("JAX_COORDINATOR_ADDRESS")
  num = num_processes if num_processes is not None else env("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else env("JAX_PROCESS_ID")
  if not (force or address or (num is not None and int(num) > 1)):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU: collectives over gloo
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=None if num is None else int(num),
                             process_id=None if pid is None else int(pid))


class _QuietLibraries(std_logging.Filter):
  """Keeps the libraries' INFO chatter (orbax per checkpoint, jax's backend probing) out of the
  run's log; their warnings still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}site-packages{os.sep}" not in (
        record.pathname)


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def stopped_before_training(signum, _frame):
  print(f"train.py: stopped by {signal.Signals(signum).name} before training started",
        file=sys.stderr, flush=True)
  sys.exit(128 + signum)


def main(argv):
  del argv  # parse_flags refused any positional argument.
  signal.signal(signal.SIGTERM, stopped_before_training)  # The run installs its own handler.
  # The trainer imports jax and more (seconds): after parsing, so --help and mistakes are instant.
  import jax  # pylint: disable=g-import-not-at-top

  import trainer  # pylint: disable=g-import-not-at-top
  from trainer import input_pipeline  # pylint: disable=g-import-not-at-top

  quiet_library_logs()
  try:
    init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                     FLAGS.distributed)
    _, summary = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, fresh=FLAGS.fresh)
  except KeyboardInterrupt:  # While connecting to the other processes.
    print("train.py: interrupted before training started", file=sys.stderr)
    sys.exit(130)
  except trainer.Interrupted as e:
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except (trainer.TrainerError, input_pipeline.DataFileError, OSError) as e:
    fail(str(e))
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
