"""Model files, loaded and saved safely: the public names of the io stage in one place.

- ``load_model`` (``bnfold.io.load``): a ``.pt2`` program, a factory, a state dict with
  ``arch``, or (only with ``trust_pickle``) a pickled module; no code from a file runs
  otherwise. See the README, "Model files and their security".
- ``save_model``, ``atomic_write``, ``write_text_atomic`` and output naming
  (``bnfold.io.save``): ``.pt2`` or pickled module, written atomically.
- ``ModelFormat``, ``LoadedModel``, ``SavedModel``, ``ModelSource`` (``bnfold.io.formats``).
"""

from bnfold.io.factory import FACTORY_SPEC, build_from_factory
from bnfold.io.formats import LoadedModel, ModelFormat, ModelSource, SavedModel
from bnfold.io.load import load_model
from bnfold.io.paths import describe_broken_link
from bnfold.io.save import (
    atomic_write,
    check_output_path,
    default_output_path,
    expected_source,
    output_format,
    save_model,
    write_text_atomic,
)

__all__ = [
    "FACTORY_SPEC",
    "LoadedModel",
    "ModelFormat",
    "ModelSource",
    "SavedModel",
    "atomic_write",
    "build_from_factory",
    "check_output_path",
    "default_output_path",
    "describe_broken_link",
    "expected_source",
    "load_model",
    "output_format",
    "save_model",
    "write_text_atomic",
]
