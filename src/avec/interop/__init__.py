"""Other tools' vector formats: llama.cpp / repeng control-vector GGUF files."""

from avec.interop.gguf_control import read_gguf_control, write_gguf_control_vector
from avec.vector import read_gguf_control_vector

__all__ = ["read_gguf_control", "read_gguf_control_vector", "write_gguf_control_vector"]
