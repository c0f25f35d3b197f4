"""sputnik: the DeepSeek-R1 system as installable Python software."""

__version__ = "0.1.0"
