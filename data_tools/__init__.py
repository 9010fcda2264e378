"""Command-line tools that prepare data sets for mpp."""

__version__ = "0.2.0"
