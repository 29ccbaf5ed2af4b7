"""The core's version: plugins declare the range of core versions they work with against it."""

__version__ = "0.1.0"
