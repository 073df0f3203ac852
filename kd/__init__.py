"""proxykd: knowledge distillation with proxy teachers (Label Smoothing++ C-matrices and more)."""

__version__ = "0.1.0"
