"""Inspection: from a preprocessed frame to a verdict (pipeline, inspector, memory bank, defect head, heatmap)."""
