"""Calibration, QAT helpers and PTQ algorithms built on quantwire's quantizers and layers."""
