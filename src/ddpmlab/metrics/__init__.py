"""Evaluation metrics: bits/dim from the variational bound (nll.py); FID, KID and IS with the papers'
Inception protocol (fid.py)."""
