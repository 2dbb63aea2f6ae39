"""One process of the 2-process jax.distributed test (tests/train/test_distributed.py).

Runs 3 sharded train steps on a fixed global batch, feeding only this process's rows, and
prints the losses as JSON. With --num_processes=1 it is the single-process reference.
"""

import json
import sys

import jax
import numpy as np
from absl import app, flags

flags.DEFINE_integer("num_processes", 1, "")
flags.DEFINE_integer("process_id", 0, "")
flags.DEFINE_string("coordinator", "", "")
FLAGS = flags.FLAGS


def main(_):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if FLAGS.num_processes > 1:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))  # tests/: conftest
  from conftest import chat_segment, packed, tiny_model_config  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from safety_align import sharding, train_step as step_lib  # pylint: disable=g-import-not-at-top

  phase_cfg = tiny.phase_config(steps=3, batch_size=8, cls_weight=0.1, lr=1e-2, split="sft")
  phase_cfg.warmup_steps = 1
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=1))
  trainer = step_lib.Trainer(tiny_model_config(d_model=64, d_ff=128), phase_cfg, "sft", mesh)
  state = trainer.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    segs = [chat_segment(query=tuple(rng.integers(6, 60, 3)),
                         response=tuple(rng.integers(6, 60, 5)), label=int(rng.integers(0, 2)))
            for _ in range(8)]
    global_batch = packed(segs, seq_len=16, batch=8)
    rows = 8 // jax.process_count()
    lo = jax.process_index() * rows
    local = {k: v[lo:lo + rows] for k, v in global_batch.items()}
    state, metrics = trainer.step(state, local)
    losses.append(float(metrics["loss"]))
  print(json.dumps(dict(process=jax.process_index(), devices=jax.device_count(),
                        losses=losses)))


if __name__ == "__main__":
  app.run(main)
