"""pgolf: the Parameter Golf challenge as a DVC pipeline of small, hashed stages."""

__version__ = "0.1.0"
