"""``python -m safety_align.serve`` as a child process: started on a free localhost port, ready
once uvicorn says it listens, stopped with SIGTERM (the serving benchmark and the server's
shutdown tests drive it)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

READY = re.compile(r"Uvicorn running on (http://\S+)")


class ServerProcess:
  """``python -m safety_align.serve`` on a free port of 127.0.0.1, its log in ``log_path``.

  A context manager: entering waits until it listens (``url``), leaving stops it (SIGTERM,
  then SIGKILL after ``stop_timeout`` s).
  """

  def __init__(self, workdir: str, log_path: str, *flags: str, start_timeout: float = 120.0,
               stop_timeout: float = 30.0):
    self.workdir, self.log_path, self.flags = workdir, log_path, flags
    self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
    self.proc: subprocess.Popen | None = None
    self.url = ""

  def __enter__(self) -> "ServerProcess":
    self._log = open(self.log_path, "w")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "safety_align.serve", f"--workdir={self.workdir}",
         "--host=127.0.0.1", "--port=0", *self.flags],
        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + self.start_timeout
    while not self.url:
      if self.proc.poll() is not None or time.monotonic() > deadline:
        self.__exit__()
        raise RuntimeError(f"The server did not start; its log ends:\n{self.log()[-3000:]}")
      found = READY.search(self.log())
      self.url = found.group(1) if found else ""
      time.sleep(0.05)
    return self

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def stop(self) -> int:
    """SIGTERM and wait; returns the exit code (SIGKILL past ``stop_timeout``: -9)."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(self.stop_timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    return self.proc.returncode

  def __exit__(self, *exc) -> None:
    self.stop()
    self._log.close()
