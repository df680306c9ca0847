"""Generating text from a steered model: the transformers decode loop (:mod:`~avec.generation.hf`)
and llama.cpp through llama-cpp-python (:mod:`~avec.generation.llamacpp`, addition only,
imported on use)."""
