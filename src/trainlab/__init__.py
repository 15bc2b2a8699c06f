"""trainlab: training-efficiency methods from recent papers, each one verified against its claim."""

__version__ = "0.1.0"
