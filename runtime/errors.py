"""Typed errors. Each names the thing that is wrong, so a user can fix it without reading our code."""

from __future__ import annotations


class RuntimeServingError(Exception):
    """Base of every error this package raises on purpose."""


# --- checkpoints -------------------------------------------------------------------------------


class CheckpointError(RuntimeServingError):
    """A checkpoint directory cannot be used."""


class UnsupportedConfigError(CheckpointError):
    """config.json describes something this runtime does not implement (names the key)."""


class MissingTensorError(CheckpointError):
    def __init__(self, name: str, where: str = "") -> None:
        super().__init__(f"missing tensor {name!r}" + (f" ({where})" if where else ""))
        self.name = name


class UnexpectedTensorError(CheckpointError):
    def __init__(self, names: list[str]) -> None:
        shown = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
        super().__init__(f"{len(names)} unexpected tensor(s) in checkpoint: {shown}")
        self.names = names


class ShapeMismatchError(CheckpointError):
    def __init__(self, name: str, expected: tuple[int, ...], actual: tuple[int, ...]) -> None:
        super().__init__(f"tensor {name!r} has shape {list(actual)}, expected {list(expected)}")
        self.name, self.expected, self.actual = name, expected, actual


class DtypeMismatchError(CheckpointError):
    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"tensor {name!r} is {actual}, expected {expected}")
        self.name = name


class CorruptCheckpointError(CheckpointError):
    """A safetensors file or index cannot be parsed."""


class RemoteCodeRefusedError(CheckpointError):
    """The checkpoint's tokenizer is a class that ships in the checkpoint as Python code, and running the
    checkpoint's code was not allowed."""

    def __init__(self, model_dir: str, class_ref: str) -> None:
        super().__init__(
            f"the tokenizer of {model_dir} is {class_ref!r}, Python code that ships in the checkpoint "
            f"(tokenizer_config.json auto_map); it runs only if you trust the checkpoint: set "
            f"`trust_remote_code: true` in the deploy YAML's args, or pass --trust-remote-code")
        self.model_dir, self.class_ref = model_dir, class_ref


class QuantizedCheckpointError(CheckpointError):
    """A quantized (INT4 compressed-tensors) checkpoint cannot be used."""


class UnsupportedQuantizationError(QuantizedCheckpointError, UnsupportedConfigError):
    """quantization_config asks for a scheme this runtime does not implement (names the key)."""


class QuantizedTensorError(QuantizedCheckpointError):
    """A packed weight and its companions (weight_scale, weight_shape) disagree or are missing."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"quantized tensor {name!r}: {problem}")
        self.name = name


# --- images ------------------------------------------------------------------------------------


class ImageError(RuntimeServingError):
    """An input image cannot be used; the message is safe to show to the client."""


class InvalidImageError(ImageError):
    """Not an image, truncated, or in a mode we cannot convert."""


class ImageTooLargeError(ImageError):
    """More pixels than the configured limit (decompression-bomb guard)."""


class ImageKeyMismatchError(RuntimeServingError):
    """The content key a request carries for an image is not the one its bytes hash to here: the
    router and the vision pool disagree on the processor config, the model or the dtype (a
    deployment out of step with itself), so the image's cached embeddings cannot be trusted.
    Not an ImageError: the client's image is fine."""

    def __init__(self, carried: str, computed: str) -> None:
        super().__init__(f"the image's content key {carried[:16]}... is not {computed[:16]}..., the key of its bytes "
                         "here (router and vision pool disagree on the processor config, model or dtype)")
        self.carried, self.computed = carried, computed


# --- requests ----------------------------------------------------------------------------------


class RequestError(RuntimeServingError):
    """A request is invalid (maps to HTTP 400). `field` names the offending field when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
