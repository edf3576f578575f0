"""dpt_engine: a training and generation engine for Dual Pseudo Training (DPT)."""

__version__ = "0.1.0"
