"""The OpenAI-compatible server behind ``python -m safety_align.serve`` (README "Serving").

``protocol`` turns requests into jobs and generations into replies, ``batcher`` runs the jobs
on one decode thread in batches, ``app`` is the FastAPI app. Streaming sends the tokens of a
finished generation: a compiled decode loop cannot hand out tokens while it runs, so the first
token comes when the whole response is done.
"""

from safety_align.serving.app import create_app
from safety_align.serving.batcher import Batcher

__all__ = ["Batcher", "create_app"]
