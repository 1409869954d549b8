"""charred: character-aware text-to-image diffusion in JAX."""
import setuptools

setuptools.setup(
    name="charred",
    version="0.1.0",
    description="Character-aware text-to-image diffusion (ByT5-conditioned U-Nets) in JAX.",
    packages=setuptools.find_packages(include=["charred", "charred.*"]),
    package_data={"charred": [
        "data/*.model",  # charred.subword's SentencePiece model
        # Gin files and sweep files: data, found by path (gin_utils.GIN_DIR), not imported.
        "gin/**/*.gin",
        "gin/sweeps/*.py",
    ]},
    python_requires=">=3.11",
    install_requires=[
        "absl-py",
        "jax[cpu]",
        "flax",
        "optax",
        "chex",  # trace-count and shape assertions (charred.models.tracing)
        "gin-config",
        "clu",
        "tensorboard",  # clu's summary writer needs it
        # Monitoring (charred.trainers.monitoring imports them only when configured):
        "wandb",
        "opentelemetry-sdk",
        "fsspec",  # profile uploads to any URL
        "orbax-checkpoint",
        "ml-collections",
        "numpy",
        "pillow",
        "jax-tqdm",  # progress bars from inside the compiled sampling loop
        "matplotlib",  # ships the DejaVu fonts the typography data is rendered with
        "wordfreq",
        "sentencepiece",  # charred.subword: the character-blind subword tokenizer
        "grain",  # the TF-free input pipeline (datasets.signs): checkpointable iterators
        "rapidfuzz",
        "rapidocr-onnxruntime==1.4.4",
        # Checkpoint formats (charred.models.convert):
        "msgpack",
        "ml-dtypes",
        "safetensors",
        "tensorstore",
        # Data layer only (charred.models / charred.trainers import without these):
        "tensorflow",
        "tensorflow-datasets",
        "seqio",
        # Web sources, filters and storage (charred.datasets):
        "pyarrow",  # img2dataset's parquet metadata
        "array-record",  # shards written by `prepare`
        "imagecodecs",  # JPEG XL (libjxl)
        "langid==1.1.6",  # offline language ID; ships its model
        "langcodes[data]",  # language names in WiT's "English: ..." caption prefixes
        "resvg-py==0.5.0",  # SVG scenes, rasterised with the bundled fonts only
        # Script and handwriting fonts (OFL 1.1 / Apache 2.0, from Google Fonts) of the synthetic
        # calligraphy (datasets.calligraphy), found by package path: ~4.5 MB in all.
        "fontpkg-great-vibes==1.103",
        "fontpkg-dancing-script==2.1",
        "fontpkg-satisfy==1.1",
        "fontpkg-caveat==2.0",
        "fontpkg-kalam==2.1",
        "fontpkg-amiri==1.2",
    ],
    extras_require={
        # PyTorch .bin checkpoints. A pinned CPU build: plain `torch` pulls GBs of CUDA.
        "torch": ["torch==2.13.0"],
        # References for the parity tests. Never torchvision: the registry's build is
        # CUDA-only and breaks `import transformers` on CPU hosts.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "diffusers", "transformers",
                 "qwix==0.1.8", "iree-base-compiler==3.13.0", "iree-base-runtime==3.13.0"],
        # AOT export (charred.aot, `python -m charred.export`): IREE's compiler and runtime,
        # one version (a .vmfb runs only on the runtime of the compiler that wrote it).
        "export": ["iree-base-compiler==3.13.0", "iree-base-runtime==3.13.0"],
        # int8 quantisation (charred.models.quantize). Pinned: its weight-only convolution
        # builds on qwix's PTQ internals.
        "int8": ["qwix==0.1.8"],
        # Host-side collectives over MPI (PartitioningConfig.collectives = 'mpi') for jobs
        # launched with mpirun. mpi4jax builds from source: it needs an MPI (Debian's
        # libopenmpi-dev) and CUDA_ROOT=/usr/local/cuda set while pip builds it.
        "mpi": ["mpi4py", "mpi4jax"],
        # `prepare --runner=...` and Beam builds of the web builders (datasets.prepare_beam).
        # Not in `test`/CI: it pins an older protobuf than seqio's TensorFlow wants, so
        # install it into its own virtualenv (`python -m venv --system-site-packages`).
        # sentencepiece 0.2.0: later wheels' generated protobuf code needs protobuf >= 7,
        # which Beam 2.77 does not allow (seqio, so `prepare --task --runner`, imports it).
        "beam": ["apache-beam==2.77.0", "sentencepiece==0.2.0"],
    },
)
