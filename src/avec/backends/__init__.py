"""Generation engines other than transformers. ``avec.backends.llamacpp``: llama.cpp through
llama-cpp-python (addition only), imported on use."""
