"""`llama`: Llama 1/2/3.x, Mistral, TinyLlama, SmolLM. The graph the others vary.

GGUF stores Q and K rows in Meta's interleaved order (RoPE pairs 2i, 2i+1); Hugging Face
checkpoints store them permuted for rotate-half, which the converter undoes."""
from .base import LLAMA_TENSORS, ROPE_NORM, Architecture

ARCH = Architecture(
    name="llama",
    models="Llama, Mistral, SmolLM, TinyLlama",
    hf_classes=("LlamaForCausalLM", "MistralForCausalLM"),
    tensors=LLAMA_TENSORS,
    rope=ROPE_NORM,
)
