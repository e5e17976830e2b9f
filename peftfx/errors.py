"""One error type for everything a user can get wrong, so callers can catch a single class."""

from __future__ import annotations


class PeftfxError(ValueError):
    """A user error. The message names the culprit: a spec field path, a file or a tensor key."""


class SpecError(PeftfxError):
    """The spec is malformed or refers to something that does not exist."""


class CaptureError(PeftfxError):
    """The model could not be captured to an FX graph."""


class CheckpointError(PeftfxError):
    """A PEFT checkpoint is missing, malformed or does not fit the model."""


class MatchError(PeftfxError):
    """A selector matched a number of sites other than the one it expects."""


class MergeError(PeftfxError):
    """An adapter cannot be folded into the weights as asked."""


class GenerationError(PeftfxError):
    """A generation asks for something its graph cannot do (more tokens than its cache holds, another batch)."""


class PassError(RuntimeError):
    """A rewrite pass left an invalid graph. This is a bug in peftfx, not a user error."""


class InputError(PeftfxError):
    """A graph was called with an input it cannot take (a routed graph's ``adapter_index``, an ONNX feed)."""
