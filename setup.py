"""Maps the source's stage folders into the one installed package, ``catcascade``.

``cnn_stage/`` installs as ``catcascade.cnn_stage``, and so on for every folder in STAGES;
``benchmarks/``, ``tests/`` and ``tools/`` are not installed. Everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

STAGES = ("cnn_stage", "vlm_stage", "ensemble", "training", "serving")

package_dir = {"catcascade": "catcascade"}
packages = ["catcascade"]
for stage in STAGES:
    package_dir[f"catcascade.{stage}"] = stage
    packages += [f"catcascade.{stage}"] + [f"catcascade.{stage}.{sub}" for sub in find_packages(stage)]

setup(package_dir=package_dir, packages=packages)
