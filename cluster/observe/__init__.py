"""Observation: the health monitor, metric export (Prometheus, TensorBoard), memory footprint
and the summaries of scored samples. Imports nothing else of ``cluster``."""
