"""mbembed: train, evaluate and ship MobileNet face-embedding models."""

__version__ = "0.1.0"
