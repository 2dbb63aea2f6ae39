"""What a person sees on the terminal when an entry point runs.

``configure()`` is the first call of every entry point's ``main``. By default only the project's
own log records reach the terminal, in a short ``HH:MM:SS message`` form; INFO records of the
libraries it drives (orbax, TFDS, TensorFlow, JAX, absl itself) are dropped, warnings and errors
of every library still show. absl's own ``--verbosity`` flag brings everything back:
``--verbosity=1`` shows the libraries' INFO records in absl's full format.

``progress(...)`` is the one progress bar of a long loop (count, rate, ETA): tqdm on stderr,
redrawn in place on a terminal and at most every ``mininterval`` seconds elsewhere.
``stage(name)`` prints one line per stage of a driver with its time.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from absl import flags, logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SHORT_FORMAT = py_logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
T = TypeVar("T")


# Library warnings that are notices, not problems: TFDS warns once per dataset it builds from a
# config ("Using custom data configuration: <the whole config>"), as the project always does.
_LIBRARY_NOTICES = ("Using custom data configuration",)


class ProjectOnly(py_logging.Filter):
  """Keeps every record of this package, and of other loggers those at ``level`` or above
  (default: warnings and errors) but ``_LIBRARY_NOTICES``."""

  def __init__(self, level: int = py_logging.WARNING):
    super().__init__()
    self.level = level

  def filter(self, record: py_logging.LogRecord) -> bool:
    if os.path.abspath(record.pathname).startswith(_PACKAGE_DIR):
      return True
    return (record.levelno >= self.level
            and not str(record.msg).startswith(_LIBRARY_NOTICES))


def verbosity() -> int:
  """absl's ``--verbosity`` when flags are parsed, else 0."""
  return flags.FLAGS.verbosity if flags.FLAGS.is_parsed() else 0


def configure(level: int | None = None) -> None:
  """Quiet library INFO logging unless ``level`` (default: absl's ``--verbosity``) is >= 1."""
  level = verbosity() if level is None else level
  handler = logging.get_absl_handler()
  for f in [f for f in handler.filters if isinstance(f, ProjectOnly)]:
    handler.removeFilter(f)
  if level >= 1:
    handler.setFormatter(logging.PythonFormatter())
    return
  logging.set_verbosity(logging.INFO)
  handler.addFilter(ProjectOnly())
  handler.setFormatter(_SHORT_FORMAT)
  for name in ("tensorflow", "jax", "orbax", "etils", "tensorflow_datasets"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()
  except ImportError:
    pass


def progress(items: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0, disable: bool = False):
  """A tqdm bar on stderr (count, rate, ETA); use as an iterator or call ``.update(n)``.
  ``disable``: nothing is drawn (e.g. when every item is cached)."""
  from tqdm import auto as tqdm_auto  # pylint: disable=import-outside-toplevel
  interactive = sys.stderr.isatty()
  return tqdm_auto.tqdm(items, total=total, desc=desc, unit=unit, initial=initial,
                        file=sys.stderr, dynamic_ncols=interactive, ncols=None if interactive
                        else 100, mininterval=0.5 if interactive else 30.0,
                        disable=disable, leave=True)


def say(message: str) -> None:
  """One line on stdout that does not break an active progress bar (the bar, on stderr, is
  cleared and redrawn under it)."""
  from tqdm import auto as tqdm_auto  # pylint: disable=import-outside-toplevel
  tqdm_auto.tqdm.write(message, file=sys.stdout)
  sys.stdout.flush()


@contextlib.contextmanager
def stage(name: str, prefix: str = "") -> Iterator[None]:
  """One line when the stage ends: ``<prefix>name: 12.3 s``."""
  t0 = time.perf_counter()
  yield
  print(f"{prefix}{name}: {time.perf_counter() - t0:,.1f} s", flush=True)


@contextlib.contextmanager
def library_quiet() -> Iterator[None]:
  """Inside: a library's own stdout prints and its warnings are dropped (TFDS prints "Downloading
  and preparing dataset …" and warns "Using custom data configuration …" for each dataset it
  builds), unless ``--verbosity`` >= 1. The project's warnings and every error still show."""
  if verbosity() >= 1:
    yield
    return
  handler = logging.get_absl_handler()
  quiet = ProjectOnly(py_logging.ERROR)
  handler.addFilter(quiet)
  try:
    with contextlib.redirect_stdout(open(os.devnull, "w")) as devnull:
      with devnull:
        yield
  finally:
    handler.removeFilter(quiet)
