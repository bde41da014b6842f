import re

from setuptools import find_packages, setup

# One version, in maml_tf/__init__.py.
with open("maml_tf/__init__.py") as f:
  VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="maml_tf",
    version=VERSION,
    description="Model-Agnostic Meta-Learning (Finn et al. 2017) for TensorFlow 2 / Keras 3",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["maml_tf", "maml_tf.*"]),
    # The shipped meta-initialisations (maml_tf.models.pretrained).
    package_data={"maml_tf": ["py.typed"],
                  "maml_tf.models": ["weights/*.json", "weights/*.h5"]},
    python_requires=">=3.10",
    # TensorFlow comes from an extra, so that each install has exactly one:
    # [cpu] tensorflow-cpu, [gpu] tensorflow[and-cuda] (BUILD_NOTES.md).
    install_requires=[
        "keras>=3.15,<3.16",
        "tensorboard>=2.21,<2.22",
        "tensorflow-datasets>=4.9,<4.10",
        "importlib_resources>=6",
        "numpy>=1.26",
        "absl-py>=2.0",
        "matplotlib>=3.8",
        "pillow>=10",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.21,<2.22"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        "test": ["pytest>=8", "pytest-xdist>=3"],
        # TFP 0.25 imports tf-keras, whose metadata requires the full
        # `tensorflow` wheel: install it with --no-deps (BUILD_NOTES.md), so
        # that it is not listed here and cannot pull in a second TensorFlow.
        "rl": ["tensorflow-probability>=0.25,<0.26",
               "gymnasium>=1.4,<1.5", "mujoco>=3.2", "imageio>=2.30"],
    },
    entry_points={"console_scripts": [
        "maml-tf-sinusoid=maml_tf.launch.sinusoid:run",
        "maml-tf-classification=maml_tf.launch.classification:run",
        "maml-tf-rl=maml_tf.launch.rl:run",
        "maml-tf-rl-compare=maml_tf.launch.rl_compare:run",
    ]},
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
)
