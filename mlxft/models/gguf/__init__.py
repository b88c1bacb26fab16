"""GGUF, the one-file model format of llama.cpp and Ollama: read into a Hugging Face folder, and
written from one (a model, or a LoRA adapter on its own), then run in llama.cpp itself.

    names.py    which architectures have a GGUF form; tensor names and layouts
    read.py     a .gguf file -> a cached folder (`--model FILE.gguf`, `--model ollama:NAME`)
    vocab.py    the tokenizer's metadata, its pre-tokenizer named by what it does
    write.py    a folder -> a .gguf file, quantized by llama.cpp's own quantizer
    adapter.py  a PEFT LoRA adapter -> llama.cpp's LoRA GGUF (`--lora`, Ollama's ADAPTER)
    runtime.py  llama.cpp through llama-cpp-python (the `llama-cpp` extra): tokenize, logits, quantize
    certify.py  the certificate: llama.cpp's tokens and greedy answers against mlxft's
"""
