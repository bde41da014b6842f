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
    package_data={"maml_tf.models": ["weights/*.json", "weights/*.h5"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow-cpu>=2.21,<2.22; platform_machine!='aarch64'",
        "keras>=3.15,<3.16",
        "tensorboard>=2.21,<2.22",
        "tensorflow-datasets>=4.9,<4.10",
        "numpy>=1.26",
        "absl-py>=2.0",
        "matplotlib>=3.8",
        "pillow>=10",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3"],
        # tf-keras must match the TF minor version; TFP 0.25 imports it.
        "rl": ["tensorflow-probability>=0.25,<0.26", "tf-keras>=2.21,<2.22",
               "gymnasium>=1.4,<1.5", "mujoco>=3.2", "imageio>=2.30"],
    },
)
