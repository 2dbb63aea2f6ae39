"""Prepare a TFDS builder (once: cached in its ``data_dir``) and read a split back as dicts.

The one prepare-and-read tail of the project's builders (``real_datasets``, ``package_data``,
``tfds_builders``): no statistics, no GCS, no progress bar, none of TFDS's prints (unless
``--verbosity`` >= 1); records in the order written.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from safety_align import console


def prepare_and_read(builder: tfds.core.DatasetBuilder, split: str,
                     manual_dir: str | None = None) -> list[dict]:
  """``split`` of ``builder`` as a list of ``{feature: value}`` (texts as ``str``, numbers as
  Python scalars), preparing it first if its ``data_dir`` lacks it. ``manual_dir``: the
  folder a manual-download builder reads its files from."""
  tfds.disable_progress_bar()
  with console.library_quiet():  # TFDS prints two lines per dataset it prepares
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP,
        try_download_gcs=False))
  columns = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  columns = {k: [x.decode("utf-8") for x in v] if v.dtype == object else v.tolist()
             for k, v in columns.items()}
  return [dict(zip(columns, values)) for values in zip(*columns.values())]
