"""One exception family for dinoserve.

Every error a user can cause is a :class:`DinoserveError` subclass whose message names
the input and says what to do. The CLI turns these into a one-line message and exit
code 1; anything else stays a traceback, because it is a bug.
"""

from __future__ import annotations


class DinoserveError(Exception):
    """Base class of every error dinoserve raises on purpose."""


# --- images -----------------------------------------------------------------------------
class ImageError(DinoserveError):
    """An input image could not be used."""


class ImageNotFoundError(ImageError):
    """An image path does not exist or is not a file."""


class ImageDecodeError(ImageError):
    """The input is empty, truncated, corrupt or not an image at all."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (a decompression bomb guard)."""


# --- models and weights -------------------------------------------------------------------
class ModelError(DinoserveError):
    """A backbone could not be built."""


class UnknownModelError(ModelError):
    """The architecture or alias name is not known."""


class WeightsError(ModelError):
    """Weights could not be found, read or loaded."""


class WeightsNotFoundError(WeightsError):
    """The weight source does not exist locally and cannot be downloaded."""


class UnreadableWeightsError(WeightsError):
    """A weights or checkpoint file is empty, truncated, damaged or not a checkpoint at all."""

    def __init__(self, path: object, problem: str,
                 advice: str = "pass a file written by torch.save or dinoserve train, a .safetensors file, "
                               "timm:<arch>.<tag> or an alias (see `dinoserve models`)"):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}; {advice}")


class UnsafeCheckpointError(WeightsError):
    """The checkpoint would need to run arbitrary code to load."""


class IncompatibleWeightsError(WeightsError):
    """The weights do not fit the architecture (missing, unexpected or mis-shaped keys)."""


# --- export and serving -------------------------------------------------------------------
class ExportError(DinoserveError):
    """ONNX export or its verification failed; the repository is left unchanged."""


class ServerError(DinoserveError):
    """The Triton server could not be found, started or reached."""


class ServerUnavailableError(ServerError):
    """No server answers at the given URL."""


class ModelNotFoundError(ServerError):
    """The server or repository has no model of that name."""


class InferenceError(ServerError):
    """A request failed on the server side."""


# --- index ------------------------------------------------------------------------------
class IndexStoreError(DinoserveError):
    """An embedding index is missing, corrupt or unusable."""


class IndexMismatchError(IndexStoreError):
    """The index was built with another model than the one asked to query it."""


# --- training ---------------------------------------------------------------------------
class TrainingError(DinoserveError):
    """Training could not start or had to stop."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DataError(DinoserveError):
    """A data folder or file list is missing, empty or malformed."""


class ConfigError(DinoserveError):
    """An option or preset value is invalid."""


class ServerTimeoutError(ServerError):
    """A request to the server took longer than the client's timeout."""


class InputTypeError(ImageError, TypeError):
    """An argument is not an image or a list of images (also a :class:`TypeError`)."""


class ModelFileError(ModelError):
    """A model file on disk (e.g. ``model.onnx``) is empty, truncated or not a model."""


class IndexDamagedError(IndexStoreError):
    """An index file does not match what was written at build time; rebuild the index."""
