"""Pure pieces of semi-supervised learning: pseudo-labels, thresholds, alignment.

As in USB (Semi-supervised-learning), thresholding and distribution alignment are
separate, swappable pieces: FlexMatch differs from FixMatch only by its threshold.
"""
