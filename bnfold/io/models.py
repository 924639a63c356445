"""Model files, loaded and saved safely: the public names of the io stage in one place
(``load_model`` from ``bnfold.io.load``, saving and output naming from ``bnfold.io.save``)."""

from bnfold.io.factory import FACTORY_SPEC
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
    "check_output_path",
    "default_output_path",
    "describe_broken_link",
    "expected_source",
    "load_model",
    "output_format",
    "save_model",
    "write_text_atomic",
]
