"""dpt_engine: a training and generation engine for Dual Pseudo Training (DPT).

Importing the package changes nothing in the process (no environment variables, no registries);
the ``dpt`` command sets its process-wide defaults when it starts (``dpt_engine.cli.main``).
"""

__version__ = "0.1.0"
