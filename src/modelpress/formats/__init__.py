"""What the numbers are: format specs, encode/decode, bit packing, byte accounting."""
from .floats import decode_float, encode_float, magnitudes, max_value
from .packing import pack_bits, packed_nbytes, unpack_bits
from .qtensor import (QTensor, bits_per_param, codes_grid, dequantize_rows, dequantize_tensor, signed, expected_nbytes, fake_quantize, grid,
                      quantize_tensor)
from .spec import ELEMENTS, Format, parse_format

__all__ = [
    "Format", "parse_format", "ELEMENTS", "QTensor", "quantize_tensor", "dequantize_tensor", "fake_quantize",
    "bits_per_param", "expected_nbytes", "codes_grid", "dequantize_rows", "signed", "grid", "pack_bits", "unpack_bits", "packed_nbytes",
    "encode_float", "decode_float", "magnitudes", "max_value",
]
