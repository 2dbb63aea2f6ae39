"""``python -m safety_align.serve --workdir=DIR [--port=8000] [--api_key=KEY] [--gate=annealing]
[--gate_calibration=off]``.

An OpenAI-compatible HTTP server (FastAPI on uvicorn): ``GET /v1/models``,
``POST /v1/chat/completions`` (streamed or not; every choice carries a ``safety`` object),
``POST /v1/safety/classify``, ``POST /v1/safety/moderate`` (the gate over any model's text),
``GET /health``, ``GET /metrics`` (Prometheus). The engine (``serving/engine.py``) decodes up
to ``--max_batch`` requests in slots, ``--chunk_tokens`` steps per compiled call; requests join
and leave between chunks, and a stream sends each chunk's tokens and safety events as soon as
it returns. SIGTERM stops accepting and drains: queued and running requests go on for up to
``--shutdown_timeout`` s in all, then those left get a 503 (or a stream's error event), and
the process exits 0.
"""

from __future__ import annotations

import os
import signal
import sys

import uvicorn
from absl import app, flags, logging

from safety_align import api, console
from safety_align.decode import SCHEDULES
from safety_align.serving import create_app

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or import_hf directory.")
_PHASE = flags.DEFINE_string("phase", "", "Phase to load ('' = the run's last phase).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free one, logged).")
_API_KEY = flags.DEFINE_string("api_key", None, "If set, /v1/*, /docs and /openapi.json "
                               "require 'Authorization: Bearer KEY'.")
_GATE = flags.DEFINE_enum("gate", None, SCHEDULES, "Gate of requests that set none (default: "
                          "the model's, calibrated or annealing).")
_CALIBRATION = flags.DEFINE_enum("gate_calibration", "on", ["on", "off"],
                                 "on: θ, τ and schedule from DIR/calibration.json when it has "
                                 "one for the checkpoint; off: the uncalibrated defaults.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Decode slots: requests decoded at once.")
_CHUNK = flags.DEFINE_integer("chunk_tokens", 8, "Decode steps per compiled call; a stream "
                              "gets its tokens chunk by chunk.")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", None, "Each slot's context in tokens "
                                      "(default: SafetyModel.slots', the model's capped to "
                                      "keep the cache small).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "max_tokens of requests that set none "
                                   "(lowered to the room left in the context).")
_MAX_CLASSIFY = flags.DEFINE_integer("max_classify_inputs", 256, "Most inputs of one "
                                     "/v1/safety/classify request (a 400 above).")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body (a 413 "
                                 "above, before parsing).")
_STREAMS = flags.DEFINE_integer("max_moderation_streams", 64, "Open /v1/safety/moderate "
                                "streams at most (a 429 above).")
_STREAM_TTL = flags.DEFINE_float("moderation_ttl_s", 600.0, "An idle moderation stream is "
                                 "dropped after this many seconds.")
_STUCK = flags.DEFINE_float("stuck_after_s", 300.0, "/health says 'stuck' (503) while one "
                            "engine call has run longer than this.")
_LOG_PROMPTS = flags.DEFINE_bool("log_prompts", False, "Put the prompt text in the log line "
                                 "of each gate firing.")
_NAME = flags.DEFINE_string("model_name", "", "Model id to report (default: the workdir's "
                            "name).")
_SHUTDOWN = flags.DEFINE_float("shutdown_timeout", 30.0, "Seconds the shutdown after SIGTERM "
                               "may take in all (draining requests, then closing).")


class _Server(uvicorn.Server):
  """uvicorn, whose exit signal also starts the engine's drain, so that the whole shutdown
  (draining, then closing connections) fits in ``--shutdown_timeout``."""

  def __init__(self, config: uvicorn.Config, engine, timeout: float):
    super().__init__(config)
    self.engine, self.timeout = engine, timeout

  def handle_exit(self, sig, frame):
    if not self.should_exit:
      self.engine.drain(max(0.0, self.timeout - 1.0))  # a second to send the last events
    super().handle_exit(sig, frame)


def _exit_cleanly(signum, frame):
  """SIGTERM outside uvicorn (while loading, and re-raised by uvicorn after its graceful
  shutdown): exit 0."""
  del signum, frame
  sys.exit(0)


def main(argv):
  del argv
  console.configure()
  signal.signal(signal.SIGTERM, _exit_cleanly)
  model = api.load(_WORKDIR.value, phase=_PHASE.value or None,
                   calibrated=None if _CALIBRATION.value == "on" else False)
  name = _NAME.value or os.path.basename(os.path.abspath(_WORKDIR.value))
  timeout = _SHUTDOWN.value
  server_app = create_app(
      model, name=name, api_key=_API_KEY.value,
      gate=_GATE.value or model.gate_defaults.schedule, max_batch=_MAX_BATCH.value,
      chunk_tokens=_CHUNK.value, max_model_len=_MAX_MODEL_LEN.value,
      max_tokens=_MAX_TOKENS.value, max_classify_inputs=_MAX_CLASSIFY.value,
      max_body_bytes=_MAX_BODY.value, max_moderation_streams=_STREAMS.value,
      moderation_ttl_s=_STREAM_TTL.value, stuck_after_s=_STUCK.value, shutdown_timeout=timeout,
      log_prompts=_LOG_PROMPTS.value)
  engine = server_app.state.engine
  server = _Server(uvicorn.Config(server_app, host=_HOST.value, port=_PORT.value,
                                  timeout_graceful_shutdown=max(0.1, timeout - 0.5)),
                   engine, timeout)
  try:
    server.run()
  finally:
    # Shut down by a signal while an engine call outlived the bound: leave it running.
    if server.should_exit and engine.alive:
      logging.warning("Exiting while an engine call still runs.")
      logging.flush()
      os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
