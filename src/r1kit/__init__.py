"""r1kit: build, train, compress, serve and apply R1-style reasoning language models."""

__version__ = "0.1.0"
