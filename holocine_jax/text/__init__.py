"""Text: the UMT5 encoder in Flax NNX, tokenizers from a local path, the tiny world's pair."""
from holocine_jax.text.encode import encode_text, load_text_stack, tiny_text_encoder
from holocine_jax.text.tokenizer import load_tokenizer, tokenize, world_tokenizer
from holocine_jax.text.umt5 import UMT5Arch, UMT5Encoder
from holocine_jax.text.weights import load_umt5

__all__ = ["UMT5Arch", "UMT5Encoder", "encode_text", "load_text_stack", "load_tokenizer", "load_umt5",
           "tiny_text_encoder", "tokenize", "world_tokenizer"]
