"""Evaluation: FID (`fid.py`) with the FID Inception network (`inception.py`)."""
