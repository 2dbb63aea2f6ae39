"""safety_align: explicit safety signals ([CLS] token + gated decoding) for LLM safety alignment."""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",  # exact: libtpu (the tpu extra) is built for one jaxlib
    "jaxlib==0.10.2",
    "flax>=0.10,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "tensorflow-datasets>=4.9.7,<4.10",
    "tensorflow-cpu>=2.17,<2.22",
    "ml-collections>=1.0,<1.2",
    "chex>=0.1.88,<0.2",
    "absl-py>=2.0,<3",
    "tokenizers>=0.20,<1",
    "jinja2>=3.1.6,<4",  # models' own chat templates (3.1.6: sandbox fixes)
    "safetensors>=0.4,<1",
    "gguf>=0.17,<1",  # llama.cpp's reader: convert import_gguf
    "importlib_resources>=6",  # etils (tfds) imports it without declaring it
    "numpy>=1.26,<3",
    "pyyaml>=6,<7",  # data/member_formats.py reads the wheels' YAML seed files
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
    "fastapi>=0.115,<1",  # python -m safety_align.serve
    "uvicorn>=0.30,<1",
    "pydantic>=2.7,<3",  # the server's request schema (v2 API)
]

setup(
    name="safety_align",
    version="0.1.0",
    description=(
        "JAX/Flax implementation of explicit safety signals for LLM safety alignment "
        "(Li & Kim, ICML 2025)."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["safety_align", "safety_align.*"]),
    package_data={"safety_align.attacks": ["data/*"],
                  "safety_align.data.corpus": ["lexicon.json"]},  # the demo corpus' word lists
    install_requires=CORE,
    extras_require={
        "cpu": ["jax[cpu]==0.10.2"],
        "gpu": ["jax[cuda12]==0.10.2"],
        # libtpu 0.0.42.* is the one jax[tpu]==0.10.2 names; tools/aot.py --target also
        # compiles for TPU slices with it on a CPU machine (tests/tools/test_aot_tpu.py).
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
        "test": [
            "jax[cpu]==0.10.2",
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",  # make test runs two workers (the suite's 15-minute bound)
            "filelock>=3.12,<5",  # locks the run's shared XLA compilation cache (tests/conftest.py)
            "torch==2.13.0",
            "transformers>=4.45,<6",
            "accelerate>=1.0,<2",  # transformers loads GGUF files with it
            "safetensors>=0.4,<1",
            "nbclient>=0.10,<1",
            "nbformat>=5.9,<6",
            "ipykernel>=6.29,<8",
            "openai>=1.40,<4",  # tests/serving/test_serve.py drives the server with the official client
            "httpx>=0.27,<1",
        ],
        # make bench also installs nanogcg==0.3.0 with --no-deps: it pins transformers<=4.47.1
        # but runs on 5.x through bench/nanogcg_compat.py.
        "bench": [
            "jax[cpu]==0.10.2",
            "torch==2.13.0",
            "transformers>=4.45,<6",
            "scipy>=1.10",
        ],
        # eval.benchmarks' IFBench checkers (benchmarks.ifbench=True); it pulls nltk, datasets
        # and pandas, so it is not a core dependency
        "benchmarks": ["if-verifiable==0.1.2"],
    },
)
