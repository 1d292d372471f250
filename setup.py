"""csl: CSL (Confidence Separable Learning) pseudo-label selection kernels and trainer.

``pip install .`` installs the pure-Python package; the C++/CUDA extension is built on first use.
"""

from setuptools import find_packages, setup

setup(
    name="csl",
    version="0.1.0",
    description="Fast, exact CSL pseudo-label selection kernels and a semi-supervised segmentation trainer",
    python_requires=">=3.10",
    packages=find_packages(include=["csl_kernels", "csl_kernels.*", "csl", "csl.*", "bench", "bench.*"]),
    package_data={"csl_kernels": ["csrc/**/*"], "csl": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
    ],
    extras_require={"test": ["pytest", "ninja"], "dev": ["pytest", "ninja", "ruff"]},
    entry_points={"console_scripts": ["csl=csl.cli:main"]},
)
