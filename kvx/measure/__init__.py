"""Measurements every stage shares: cache bytes (measured and planned), perplexity, and attention
statistics (lazy ratios, top-k recall, cross-layer and cross-scale similarity)."""
