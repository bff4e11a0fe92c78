"""titok_jax: JAX/Flax image tokenizers (TiTok, FlexTok, FlowMo), their quantizers and generators."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.10",
    "ml-collections>=1.0.0",
    "tensorflow-datasets>=4.9.7",
    "absl-py>=2.1.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "scikit-image>=0.24",
    "safetensors>=0.4",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "matplotlib>=3.8",   # the plots of titok_jax.evaluation.plots (Agg, imported lazily)
]

EXTRAS_REQUIRE = {
    # What the test suite needs beyond the runtime: pytest, scipy for float64 references.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "scipy>=1.11"],
    # Reading official `.bin` checkpoints in `import-torch`; `.safetensors` loads without it.
    # 2.13.0 is the CPU build that ships on the development machines; any >= works elsewhere.
    "torch": ["torch>=2.5"],
    # Decoding compressed videos (.mp4/.webm/.mkv/.mov/.avi) for `data.source=video_folder:PATH`;
    # GIFs and folders of frame images need nothing beyond the base install.
    "video": ["av>=12.0"],
    # benchmarks/vs_reference.py: building the official PyTorch models from their checkouts;
    # einops + einx: lucidrains/vector-quantize-pytorch in benchmarks/vs_quantizers.py.
    "reference": ["torch>=2.5", "omegaconf>=2.3", "einops>=0.8.0", "einx>=0.3.0"],
}

setup(
    name="titok_jax",
    version="0.1.0",
    description="JAX/Flax image tokenizers (TiTok, FlexTok, FlowMo), quantizers and generators",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["titok_jax", "titok_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["titok-jax=titok_jax.cli:main"]},
)
