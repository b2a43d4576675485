"""GGUF files and ggml block formats: reader, writer, NumPy reference codecs.

Imports nothing else of kiln's.
"""
from .constants import (GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION, FormatError,
                        GGMLType, GGUFValueType, LlamaFileType, file_type_of, row_nbytes)
from .metadata import GGUFMetadata, GGUFValue
from .quants import DECODABLE_TYPES, ENCODABLE_TYPES, FLOAT_TYPES, dequantize, quantize
from .reader import GGUFFile, Tensor, read_gguf
from .weighted import WEIGHTED_TYPES, quantize_weighted
from .writer import GGUFWriter, GGUFWriterError, write_gguf

__all__ = [
    "GGML_QUANT_SIZES", "GGUF_DEFAULT_ALIGNMENT", "GGUF_VERSION", "FormatError", "GGMLType",
    "GGUFValueType", "LlamaFileType", "file_type_of", "row_nbytes", "DECODABLE_TYPES",
    "ENCODABLE_TYPES", "FLOAT_TYPES", "GGUFMetadata", "GGUFValue", "dequantize", "quantize",
    "GGUFFile", "Tensor", "read_gguf", "GGUFWriter", "GGUFWriterError", "write_gguf",
    "WEIGHTED_TYPES", "quantize_weighted",
]
