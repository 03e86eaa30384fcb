"""fedssl: semi-supervised and personalized federated learning of image classifiers."""

__version__ = "0.1.0"

import os

# albumentations asks PyPI for a newer version when imported unless told not to;
# fedssl runs offline, so it never asks.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
