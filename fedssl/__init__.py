"""fedssl: semi-supervised and personalized federated learning of image classifiers."""

__version__ = "0.1.0"
