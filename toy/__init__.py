"""Toy 2-D Gaussian-mixture experiments for DDIL: exact mixtures, exact scores, and sample-quality metrics."""
