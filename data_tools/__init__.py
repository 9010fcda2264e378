"""Command-line tools that prepare data sets for mpp."""

__version__ = "0.1.0"
