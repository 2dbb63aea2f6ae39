"""``python -m safety_align.serve --workdir=DIR [--port=8000] [--api_key=KEY] [--gate=annealing]
[--gate_calibration=off]``.

An OpenAI-compatible HTTP server (FastAPI on uvicorn): ``GET /v1/models``,
``POST /v1/chat/completions`` (streamed or not; every choice carries a ``safety`` object),
``POST /v1/safety/classify``, ``GET /health``. Concurrent requests are decoded together: jobs
that arrive within ``--batch_window_ms`` of each other and share the gate, the sampler
settings and the ``max_tokens`` bucket go through one compiled decode call (up to
``--max_batch``). Streaming replays a finished generation token by token (the compiled loop
hands out nothing while it runs). SIGTERM stops accepting, lets in-flight requests finish
(those still running after ``--shutdown_timeout`` get a 503) and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys

import uvicorn
from absl import app, flags, logging

from safety_align import api
from safety_align.decode import SCHEDULES
from safety_align.serving import create_app

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or import_hf directory.")
_PHASE = flags.DEFINE_string("phase", "", "Phase to load ('' = the run's last phase).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free one, logged).")
_API_KEY = flags.DEFINE_string("api_key", None, "If set, /v1/* requires 'Authorization: "
                               "Bearer KEY'.")
_GATE = flags.DEFINE_enum("gate", None, SCHEDULES, "Gate of requests that set none (default: "
                          "the model's, calibrated or annealing).")
_CALIBRATION = flags.DEFINE_enum("gate_calibration", "on", ["on", "off"],
                                 "on: θ, τ and schedule from DIR/calibration.json when it has "
                                 "one for the checkpoint; off: the uncalibrated defaults.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most requests per decode call.")
_WINDOW = flags.DEFINE_float("batch_window_ms", 15.0, "How long a request waits for others "
                             "to share its decode call.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "max_tokens of requests that set none "
                                   "(lowered to the room left in the context).")
_NAME = flags.DEFINE_string("model_name", "", "Model id to report (default: the workdir's "
                            "name).")
_SHUTDOWN = flags.DEFINE_float("shutdown_timeout", 30.0, "Seconds shutdown waits for "
                               "in-flight requests.")


def _exit_cleanly(signum, frame):
  """SIGTERM outside uvicorn (while loading, and re-raised by uvicorn after its graceful
  shutdown): exit 0."""
  del signum, frame
  sys.exit(0)


def main(argv):
  del argv
  signal.signal(signal.SIGTERM, _exit_cleanly)
  model = api.load(_WORKDIR.value, phase=_PHASE.value or None,
                   calibrated=None if _CALIBRATION.value == "on" else False)
  name = _NAME.value or os.path.basename(os.path.abspath(_WORKDIR.value))
  server_app = create_app(model, name=name, api_key=_API_KEY.value,
                          gate=_GATE.value or model.gate_defaults.schedule,
                          max_batch=_MAX_BATCH.value, window_s=_WINDOW.value / 1e3,
                          max_tokens=_MAX_TOKENS.value, shutdown_timeout=_SHUTDOWN.value)
  server = uvicorn.Server(uvicorn.Config(server_app, host=_HOST.value, port=_PORT.value,
                                         timeout_graceful_shutdown=_SHUTDOWN.value))
  try:
    server.run()
  finally:
    # Shut down by a signal while a decode call outlived the grace period: leave it running.
    if server.should_exit and not server_app.state.batcher.stopped:
      logging.warning("Exiting while a decode call still runs.")
      logging.flush()
      os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
