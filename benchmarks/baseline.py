"""The ``jaxce`` package of an older git revision, importable beside the current one.

``--baseline REV`` in ``bench_losses.py`` and ``bench_linear.py`` times it side by side with the
working tree's jaxce in the same process (the no-regression check).
"""

from __future__ import annotations

import importlib
import io
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile


def import_jaxce(rev):
  """Imports the ``jaxce`` package of git revision ``rev`` as a module ``jaxce_<rev>``."""
  repo = pathlib.Path(__file__).resolve().parent.parent
  try:
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "jaxce"],
                             check=True, capture_output=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    why = (getattr(e, "stderr", b"") or b"").decode().strip() or e
    raise SystemExit(f"benchmarks: cannot read revision {rev!r}: {why}") from e
  root = pathlib.Path(tempfile.mkdtemp(prefix="jaxce_baseline_"))
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    tar.extractall(root, filter="data")
  name = "jaxce_" + re.sub(r"\W", "_", rev)
  package = root / name
  (root / "jaxce").rename(package)
  for path in package.rglob("*.py"):  # its absolute imports, and its JAX config option names
    text = re.sub(r"\bjaxce\b(?=[._ ])", name, path.read_text())
    path.write_text(text.replace('"jaxce_', f'"{name}_'))
  sys.path.insert(0, str(root))
  return importlib.import_module(name)
