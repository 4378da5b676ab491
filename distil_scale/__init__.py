"""distil-scale: DistilBERT-style distillation pretraining at cluster scale."""

__version__ = "0.1.0"
