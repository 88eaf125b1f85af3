"""The method registry: every training method, one file each, listed by name.

Tests and the CLI iterate over `METHODS`, so a method added here is tested and listed
automatically.
"""

from colam.methods.base import Method, soft_cross_entropy
from colam.methods.colam import Colam
from colam.methods.cp import ConfidencePenalty
from colam.methods.disturblabel import DisturbLabel
from colam.methods.hl import HardLabels
from colam.methods.ls import LabelSmoothing

METHODS: dict[str, type[Method]] = {m.name: m for m in (HardLabels, LabelSmoothing, ConfidencePenalty, DisturbLabel, Colam)}

__all__ = ["METHODS", "Method", "soft_cross_entropy"]
