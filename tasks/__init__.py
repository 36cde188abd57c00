"""Benchmarks (versioned definitions), scorers and task sequences."""
