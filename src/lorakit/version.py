"""lorakit's version: a leaf module, so files that stamp it into what they write need not import the package face."""

__version__ = "0.1.0"
