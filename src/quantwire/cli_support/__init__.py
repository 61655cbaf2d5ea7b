"""Helpers of the ``quantwire`` command (:mod:`quantwire.cli`): the digits demo and its report,
per-layer statistics, and the models, checkpoints and calibration data the commands read."""
