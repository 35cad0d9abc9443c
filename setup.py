"""Packages of the medclip-torch distribution (metadata and dependencies are in setup.cfg).

The recipes, evaluation suites and dataset manifests stay at the repository's top level (one copy
in git) and are shipped as the data packages below; medclip/resources.py reads them.
"""

from setuptools import find_packages, setup

DATA_PACKAGES = {
    "medclip.recipes": "pretrain",
    "medclip.suites": "zero_shot",
    "medclip.manifests": "datasets_manifests",
}
# Data-only folders inside medclip/ (no __init__.py) that are shipped too.
DATA_FOLDERS = ["medclip.assets", "medclip.model_configs"]

setup(
    packages=find_packages(include=["medclip", "medclip.*"]) + DATA_FOLDERS + list(DATA_PACKAGES),
    package_dir=DATA_PACKAGES,
)
