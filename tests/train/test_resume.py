"""Nothing is lost: a run killed (SIGKILL) and one preempted (SIGTERM) both resume and end with
exactly the parameters of an uninterrupted run."""

import os
import re
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from safety_align import checkpoint
from safety_align import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 16
ARGS = [f"--config={ROOT / 'configs/tiny.py'}:smoke", f"--config.pretrain.steps={STEPS}",
        f"--config.sft.steps={STEPS}", "--config.checkpoint.every_steps=2",
        "--config.checkpoint.keep=2"]


def _train(workdir, extra=()):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "safety_align.train", f"--workdir={workdir}",
                           *ARGS, *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, phase, step, timeout=300):
  path = pathlib.Path(checkpoint.phase_dir(workdir, phase))
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists() and any(p.name.isdigit() and int(p.name) >= step for p in path.iterdir()):
      return
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.02)
  raise TimeoutError(f"no {phase} checkpoint >= {step} in {timeout}s")


def _final_params(workdir):
  params, meta, phase = checkpoint.latest_params(str(workdir), workdir_lib.INFERENCE_PHASES)
  assert phase == "sft" and meta["step"] == STEPS
  return jax.tree.map(np.asarray, params)


@pytest.mark.slow
def test_killed_and_preempted_run_ends_like_an_uninterrupted_one(tmp_path):
  straight = _train(tmp_path / "straight")
  assert straight.wait() == 0, straight.stderr.read()[-3000:]
  library_info = [line for line in straight.stderr.read().splitlines()
                  if re.match(r"I\d{4} [\d:.]+ +\d+ \w+\.py:\d+\]", line)]  # orbax's, via absl
  assert not library_info, library_info[:3]  # console.configure keeps the terminal readable

  work = tmp_path / "interrupted"
  proc = _train(work)
  _wait_for_step(proc, work, "pretrain", 4)
  proc.kill()  # SIGKILL mid-pretraining, possibly mid-save
  proc.wait()
  proc = _train(work)
  _wait_for_step(proc, work, "sft", 4)
  proc.send_signal(signal.SIGTERM)  # preemption mid-SFT: saves and exits cleanly
  assert proc.wait() == 0, proc.stderr.read()[-3000:]
  sft_steps = [int(p.name) for p in pathlib.Path(checkpoint.phase_dir(work, "sft")).iterdir()
               if p.name.isdigit()]
  assert max(sft_steps) < STEPS, "SIGTERM came too late to test preemption"
  proc = _train(work)
  assert proc.wait() == 0, proc.stderr.read()[-3000:]

  a, b = _final_params(tmp_path / "straight"), _final_params(work)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # bitwise: same data, same steps, deterministic CPU XLA
