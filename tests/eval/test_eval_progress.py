"""The evaluation's progress: per-step lines with an ETA, or one bar over the planned cost."""

from safety_align.eval.progress import Progress


def _run(progress, stored=()):
  for name, cost in (("direct", 100), ("prefill_5", 300), ("benign", 50)):
    progress.plan(name, cost)
  for name in ("direct", "prefill_5", "benign"):
    progress.start(name)
    progress.finish(name, stored=name in stored)


def test_lines_say_where_the_run_is_with_an_eta_once_a_step_ran():
  lines = []
  _run(Progress(lines.append))
  assert lines[0].startswith("[1/3] direct: starting") and "ETA unknown" in lines[0]
  assert lines[2].startswith("[3/3] benign: starting") and "ETA ~" in lines[2]


def test_bar_counts_the_planned_cost_and_stored_steps_leave_it(capsys):
  progress = Progress(lambda m: None, bar=True)
  _run(progress, stored=("prefill_5",))
  err = capsys.readouterr().err
  # prefill_5 came from the store: it costs nothing, so the bar ends at 150 of 150.
  assert "150/150" in err and "evaluation" in err
  assert progress._bar is None  # closed once every planned step finished


def test_compiled_programs_are_released_past_half_the_mapping_limit(monkeypatch):
  """A long evaluation drops its compiled programs once the process holds more than half the
  kernel's memory mappings (each program maps its code; the limit ended a 1.7 h run), and
  keeps them below that."""
  import jax  # pylint: disable=g-import-not-at-top
  from safety_align.eval import runner  # pylint: disable=g-import-not-at-top
  held, limit = runner.memory_maps()
  assert 0 < held < limit  # this Linux machine's /proc
  f = jax.jit(lambda x: x + 1)
  f(1.0)
  lines = []
  monkeypatch.setattr(runner, "memory_maps", lambda: (500, 1000))
  runner.release_compiled(lines.append)
  assert f._cache_size() == 1 and not lines  # pylint: disable=protected-access
  monkeypatch.setattr(runner, "memory_maps", lambda: (501, 1000))
  runner.release_compiled(lines.append)
  assert f._cache_size() == 0  # pylint: disable=protected-access
  assert lines == ["released compiled programs (501 of 1000 memory mappings held)"]
