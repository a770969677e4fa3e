"""Errors a user can act on. The CLI prints their message alone, no traceback."""

from __future__ import annotations


class CanaoError(Exception):
    """Base class: the message names the problem and, where there is one, the fix."""


class ModelNotFoundError(CanaoError):
    """A model path or name that does not resolve to a model."""


class InvalidModelConfigError(CanaoError):
    """A config file or preset that does not describe a valid BERT."""


class UnknownTargetError(CanaoError):
    """A target name not in the target map."""


class ToolchainError(CanaoError):
    """A compiler or linker this target needs that is missing or cannot link here."""


class UnknownPipelineError(CanaoError):
    """A pipeline name not in the pipeline map."""


class NumericsMismatchError(CanaoError):
    """A compiled model whose output differs from PyTorch beyond tolerance."""


class DeviceUnreachableError(CanaoError):
    """An RPC tracker, server or device key that does not answer in time."""


class ArtifactError(CanaoError):
    """An exported artifact folder that is missing or malformed."""
