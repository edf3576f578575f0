"""Sample-quality evaluation: FID, KID and precision/recall with the TF-FID Inception, offline.

Everything lives in :mod:`dpt_engine.eval.fid` (import it from there; importing it registers the
``"dpt-inception-v3-tf"`` feature extractor with torch-fidelity). This package stays empty so
``import dpt_engine.eval`` is cheap and works without torch-fidelity.
"""
