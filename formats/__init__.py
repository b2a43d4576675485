"""GGUF files and ggml block formats: reader, writer, NumPy reference codecs.

Imports nothing else of kiln's. See DESIGN.md, "Lower-level contracts".
"""
from .constants import (GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION, FormatError,
                        GGMLType, GGUFValueType, row_nbytes)
from .metadata import GGUFMetadata, GGUFValue
from .quants import dequantize, quantize
from .reader import GGUFFile, Tensor, read_gguf
from .writer import GGUFWriter, GGUFWriterError, write_gguf

__all__ = [
    "GGML_QUANT_SIZES", "GGUF_DEFAULT_ALIGNMENT", "GGUF_VERSION", "FormatError", "GGMLType",
    "GGUFValueType", "row_nbytes", "GGUFMetadata", "GGUFValue", "dequantize", "quantize",
    "GGUFFile", "Tensor", "read_gguf", "GGUFWriter", "GGUFWriterError", "write_gguf",
]
