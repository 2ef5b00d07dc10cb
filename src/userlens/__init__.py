"""userlens: user embeddings learned without labels from interaction logs."""

__version__ = "0.1.0"
