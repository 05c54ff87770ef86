"""qsae: sparse autoencoders trained by a ZeroMQ master and long-lived workers."""

__version__ = "0.1.0"
