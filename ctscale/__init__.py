"""ctscale: Child-Tuning (CT-F, CT-D) at distributed scale."""

__version__ = "0.1.0"
