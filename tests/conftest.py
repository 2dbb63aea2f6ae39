"""Test setup: 8 fake CPU devices (sharding tests) and no other backend, float32 everywhere,
shared tiny fixtures (the tiny config, [CLS] rows, the tiny SafetyModel ``model``, and a
finished smoke training run ``trained``)."""

import atexit
import glob
import hashlib
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CPU backend only: `make test` installs libtpu (tests/tools/test_aot_tpu.py compiles for a TPU
# in its own process), and JAX would otherwise load it here and in every CLI a test starts.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache for the whole run: both xdist workers and every CLI,
# notebook and server a test starts (they inherit the environment) compile the tiny model's
# programs once instead of once per process. A fresh folder per run (removed at its end), so a
# run's time never depends on an earlier run's cache. A size bound turns on JAX's file lock
# (filelock), without which one worker could read an entry the other is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="safety_align_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ importable

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

from configs import tiny  # noqa: E402
from safety_align import api, training_loop  # noqa: E402
from safety_align.data import chat_templates  # noqa: E402
from safety_align.data.packing import build_segment, pack  # noqa: E402
from safety_align.data.tokenizer import Tokenizer, train_bpe  # noqa: E402
from safety_align.masks import Role  # noqa: E402
from safety_align.model import ModelConfig, init_params  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 64


def tiny_model_config(**overrides) -> ModelConfig:
  values = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                init_scale=0.3)
  values.update(overrides)
  return ModelConfig(**values)


@pytest.fixture
def model_cfg():
  return tiny_model_config()


def tiny_params(cfg: ModelConfig, seed: int = 0):
  """``cfg``'s random initialisation from ``jax.random.key(seed)``, unboxed."""
  return nn.meta.unbox(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed)))


def tiny_tokenizer(texts, vocab_size: int, path, template: str = "demo") -> Tokenizer:
  """A byte-level BPE of ``vocab_size`` pieces trained on ``texts``, with ``template``'s
  special tokens, saved at ``path``."""
  return train_bpe(list(texts), vocab_size, str(path),
                   chat_templates.get_template(template).special_tokens)


# What the shared tiny model's BPE is trained on.
TEXTS = ["how do I bake bread", "how do I pick a lock", "tell me a story about a cat",
         "Sorry, I cannot fulfill your request because it is harmful"] * 4


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
  """(config, params, tokenizer) of the shared tiny model, built once per session: a 300-piece
  BPE over TEXTS with the demo template's special tokens, the tiny config at vocab 320, key 0."""
  tok = tiny_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")
  cfg = tiny_model_config(vocab_size=320)
  return cfg, tiny_params(cfg), tok


@pytest.fixture(scope="module")
def model(tiny_parts):
  """The shared tiny [CLS] SafetyModel (demo template, max_length 96), one per test module."""
  cfg, params, tok = tiny_parts
  return api.SafetyModel(cfg, params, tok, chat_templates.get_template("demo"), max_length=96)


def chat_segment(query=(10, 11, 12), response=(20, 21, 22, 23), label=1, windows=(),
                 untrained=()):
  """``[CLS] <s> [INST] query [/INST] response`` with fixed small token ids."""
  pieces = [([1], Role.BOS), ([3, 4], Role.TEMPLATE), (list(query), Role.QUERY),
            ([5], Role.TEMPLATE), (list(response), Role.RESPONSE)]
  return build_segment(VOCAB, pieces, label, windows=windows, untrained=untrained)


def packed(segments, seq_len=24, batch=1):
  return pack(segments, batch, seq_len)


def smoke_config(phases="pretrain,sft", steps=4, like=None):
  """The smoke config, 8-row batches, checkpoints every 2 steps; ``like``: a workdir whose
  prepared data and tokenizer to reuse."""
  c = tiny.get_config("smoke")
  c.phases = phases
  if like is not None:
    c.data.update(data_dir=str(like / "tfds"), tokenizer=str(like / "tokenizer.json"))
  for phase in (c.pretrain, c.sft):
    phase.update(steps=steps, batch_size=8)  # the 8 devices above
  c.checkpoint.update(every_steps=2, keep=2, async_save=False)
  return c


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A finished two-phase smoke run (``smoke_config()``): checkpoints pretrain/{2,4},
  sft/{2,4}. Shared: a test that changes it works on a copy."""
  work = tmp_path_factory.mktemp("run") / "w"
  training_loop.train(smoke_config(), str(work))
  return work


def file_digests(path) -> dict:
  """{relative path: SHA-256} of every file under ``path``."""
  return {os.path.relpath(f, path): hashlib.sha256(open(f, "rb").read()).hexdigest()
          for f in sorted(glob.glob(f"{path}/**", recursive=True)) if os.path.isfile(f)}


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Drop every compiled program after each test module. XLA:CPU maps each executable's code
  into the process, and the whole suite's programs kept alive in one pytest process pass the
  kernel's map limit (vm.max_map_count, 65,530 here): a later compile then dies with SIGSEGV or
  an LLVM allocation abort, in whichever test happens to compile next."""
  yield
  jax.clear_caches()
