"""llama.cpp's `llama-server` on this machine: getting the binary (`binary`) and running
it on a model (`process`). The backends that query running engines are in lmq.backends."""
