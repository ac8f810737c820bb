"""llama.cpp runs GGUF files; the embedded SmolLM2 ships as Q4_1. To compare engines at equal
bytes per weight, the harness writes float32 and float16 copies of it: same metadata,
every tensor dequantized."""

from pathlib import Path

import numpy as np

FILE_TYPES = {"f32": (np.float32, 0), "f16": (np.float16, 1)}  # llama.cpp's ALL_F32, MOSTLY_F16


def write_unquantized(src: Path, dst: Path, kind: str) -> Path:
    """Write `src` with every tensor dequantized to `kind` ("f32" or "f16"), unless `dst`
    exists. 1-D tensors (norms) stay float32, as llama.cpp's converter keeps them."""
    import gguf

    if dst.is_file():
        return dst
    dtype, file_type = FILE_TYPES[kind]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, data.astype(np.float32 if data.ndim == 1 else dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst
