"""dpt_engine: a training and generation engine for Dual Pseudo Training (DPT)."""

import os as _os

# OpenMP threads that spin while waiting make a loaded CPU (a laptop running anything else,
# a shared CI box) up to 5-20x slower for the many small ops of small models: measured here,
# a U-ViT training step took 3.9 s with spinning threads vs 0.69 s with passive waits while
# other jobs ran. Passive waiting is the default unless the user chose otherwise; it only
# takes effect when dpt_engine is imported before torch starts its thread pool (as `dpt` does).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
