"""The OpenAI-compatible server behind ``python -m safety_align.serve`` (README "Serving"), laid
out as vLLM's OpenAI entrypoint, each module importing only those below it:

``app`` (HTTP routes) > ``handler`` (requests into engine jobs, engine events into replies and
server-sent events) > ``engine`` (the scheduler over ``SafetyModel.slots``: requests join and
leave between chunks) and ``streams`` (open moderation streams) > ``protocol`` (pydantic
bodies) and ``metrics`` (Prometheus text) > the model object (``safety_align.api``).
"""

from safety_align.serving.app import create_app

__all__ = ["create_app"]
