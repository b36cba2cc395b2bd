"""Installs the GPU suite's wheels into a side folder, offline, without touching the image.

    python3 benchmarks/gpu_install.py .gpu/wheels .gpu/site
    export PYTHONPATH=$PWD/.gpu/site

For each wheel in the first folder (made by ``benchmarks/gpu_wheels.sh``) it installs, with
``pip install --no-deps --no-index --target``, those whose distribution the interpreter lacks or
has in an older version (jaxce always), so nothing the image already has is shadowed by an older
or a different build. tokamax imports ``xprof`` (a 22 MB profiler it uses only for its own
benchmarking helpers); when the image has no xprof, a stub of the one name tokamax imports is
written instead. Run it with the interpreter that will run the suite, before setting PYTHONPATH.
Only the standard library (and pip, when there is one) is used.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile

ALWAYS = {"jaxce"}
XPROF_STUB = '''"""Stand-in for xprof, which tokamax imports only for its benchmarking helpers."""


class _Missing:

  def __getattr__(self, name):
    raise RuntimeError("xprof is not installed (gpu_install.py wrote this stub)")


get_kernel_stats_tool = _Missing()
'''


def normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: str) -> tuple[str, str]:
  """``("pydantic-core", "2.50.5")`` from ``pydantic_core-2.50.5-cp312-....whl``."""
  name, version = os.path.basename(path).split("-")[:2]
  return normalize(name), version


def version_key(version: str) -> tuple:
  """A sortable key: numeric release parts, then the rest (good enough for >= between builds)."""
  try:
    from packaging.version import Version  # pylint: disable=g-import-not-at-top
    return (0, Version(version))
  except Exception:  # noqa: BLE001  (no packaging, or a version it cannot parse)
    parts = re.findall(r"\d+", version.split("+")[0])
    return (1, tuple(int(p) for p in parts))


def installed_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def choose(wheels: list[str]) -> tuple[list[str], list[str]]:
  """(wheels to install, lines saying what is kept from the image)."""
  install, kept = [], []
  for path in sorted(wheels):
    name, version = wheel_name_version(path)
    have = installed_version(name)
    if name in ALWAYS or have is None:
      install.append(path)
      continue
    try:
      newer = version_key(have) >= version_key(version)
    except TypeError:
      newer = False
    if newer:
      kept.append(f"{name} {have} (image; wheel {version})")
    else:
      install.append(path)
  return install, kept


def unpack(wheels: list[str], target: str) -> None:
  """What ``pip install --target`` does for the wheels here, when the image has no pip."""
  for path in wheels:
    with zipfile.ZipFile(path) as z:
      for member in z.namelist():
        parts = member.split("/")
        if parts[0].endswith(".data"):
          if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
            data = z.read(member)
            dest = os.path.join(target, *parts[2:])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
              f.write(data)
          continue
        z.extract(member, target)


def install(wheels: list[str], target: str) -> str:
  os.makedirs(target, exist_ok=True)
  if not wheels:
    return "nothing to install"
  if importlib.util.find_spec("pip") is not None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
           "--disable-pip-version-check", "--no-warn-conflicts", "--upgrade", "--target", target,
           *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
      return "pip"
    print(f"gpu_install: pip failed, unpacking instead:\n{proc.stderr[-2000:]}", file=sys.stderr)
  unpack(wheels, target)
  return "unzip"


def write_xprof_stub(target: str) -> bool:
  if importlib.util.find_spec("xprof") is not None or os.path.isdir(os.path.join(target, "xprof")):
    return False
  for folder, text in (("xprof", ""), ("xprof/cli", "")):
    os.makedirs(os.path.join(target, folder), exist_ok=True)
    with open(os.path.join(target, folder, "__init__.py"), "w") as f:
      f.write(text)
  with open(os.path.join(target, "xprof", "cli", "tools.py"), "w") as f:
    f.write(XPROF_STUB)
  return True


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("wheels", help="folder of .whl files (benchmarks/gpu_wheels.sh)")
  p.add_argument("target", help="side folder to install into (then put it on PYTHONPATH)")
  args = p.parse_args(argv)
  wheels = glob.glob(os.path.join(args.wheels, "*.whl"))
  if not wheels:
    raise SystemExit(f"gpu_install: no wheels in {args.wheels} (run benchmarks/gpu_wheels.sh)")
  chosen, kept = choose(wheels)
  how = install(chosen, args.target)
  stub = write_xprof_stub(args.target)
  print(f"gpu_install: installed {len(chosen)} wheels into {args.target} ({how}): "
        f"{', '.join(' '.join(wheel_name_version(w)) for w in chosen)}")
  if kept:
    print(f"gpu_install: kept from the image: {'; '.join(kept)}")
  if stub:
    print("gpu_install: no xprof in the image: wrote a stub for tokamax's import")


if __name__ == "__main__":
  main()
