"""ecar_infer: an inference-optimized sampling engine for E-CAR (multistage continuous AR image generation)."""
import platform

from setuptools import setup

# Triton wheels exist only for Linux x86-64; elsewhere the reference backends run.
TRITON = ["triton"] if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") else []

setup(
    name="ecar_infer",
    version="0.1.0",
    description="Fast, exact sampling engine for E-CAR multistage continuous autoregressive image models",
    python_requires=">=3.10",
    packages=["ecar_infer", "ecar_infer.model", "ecar_infer.training", "ecar_infer.kernels", "ecar_infer.weights"],
    # kernels/ and weights/ live at the top of the repo but install inside the package
    package_dir={"ecar_infer.kernels": "kernels", "ecar_infer.weights": "weights"},
    package_data={"ecar_infer.weights": ["*.safetensors", "*.md", "*.png"]},
    install_requires=["torch", "diffusers", "safetensors", "numpy", "pillow", "tqdm"] + TRITON,
    extras_require={
        # pytest-xdist: the GPU suite runs the GPU tests in parallel (and CI rehearses it)
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "scikit-learn", "scipy", "matplotlib"],
        # digits32 renders matplotlib's bundled fonts, which also draws loss.png; quality evaluation
        # uses scikit-learn and scipy
        "train": ["matplotlib", "scikit-learn", "scipy"],
        "flash": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "ecar-sample=ecar_infer.cli:main",
            "ecar-edit=ecar_infer.edit_cli:main",
            "ecar-train=ecar_infer.training.train_cli:main",
        ]
    },
)
