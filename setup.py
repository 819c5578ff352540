"""Kept beside pyproject.toml (which holds all the metadata) for tools that run ``setup.py``."""

from setuptools import setup

setup()
