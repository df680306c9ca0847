"""File formats read from untrusted sources, each checked with bounded work before it is parsed:
JSON (:mod:`~avec.formats.jsonsafe`), safetensors headers, GGUF headers, llama.cpp / repeng
control-vector GGUF files, and what a steering-vector file must hold (:mod:`~avec.formats.vector_checks`).

``avec.vector.read_gguf_control_vector`` turns a control-vector GGUF into a
:class:`~avec.SteeringVector`."""
