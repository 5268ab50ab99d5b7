"""Evaluation: accuracy of a recipe on a labelled dataset (AUROC, AUPRO, escape at a false-reject rate)."""
