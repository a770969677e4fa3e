"""canao: compiler-aware neural architecture search of BERT models for edge devices."""

from __future__ import annotations

__version__ = "0.1.0"
