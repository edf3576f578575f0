"""Sample-quality evaluation: FID, KID and precision/recall with the TF-FID Inception, offline.

:mod:`dpt_engine.eval.fid` is the entry point (``compute_metrics``; it re-exports the public names
of :mod:`.inception`, :mod:`.features` and :mod:`.metrics`). ``register_with_torch_fidelity()``
registers the ``"dpt-inception-v3-tf"`` feature extractor with torch-fidelity; importing registers
nothing. This package stays empty so ``import dpt_engine.eval`` is cheap and works without
torch-fidelity.
"""
