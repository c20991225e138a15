"""Toy Gaussian-mixture experiments (2-D, and lifted to D dimensions) for DDIL: exact mixtures, exact scores, and sample-quality metrics."""
