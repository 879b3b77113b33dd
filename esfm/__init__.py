"""esfm: train a factorization machine recommender and serve it from Elasticsearch."""

from __future__ import annotations

__version__ = "0.1.0"
