"""hetpfl: personalized federated learning across heterogeneous clients."""

__version__ = "0.1.0"
