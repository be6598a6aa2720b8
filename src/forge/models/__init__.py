"""forge.models: one decoder for the Llama 3 / Qwen2 / Qwen3 families, HF I/O, tokenizers, tiny models."""

from forge.models.args import ModelArgs, UnknownArchitectureError
from forge.models.decoder import CausalLM
from forge.models.hf_io import CheckpointError, load_args, load_model, load_state_dict_into, save_model
from forge.models.logprobs import compute_logprobs, logprobs_from_hidden
from forge.models.parallel import enable_activation_checkpointing, maybe_compile
from forge.models.tiny import build_tiny_model, tiny_args, write_tiny_checkpoint
from forge.models.tokenizer import apply_chat_template, load_tokenizer, tiny_tokenizer_path

__all__ = [
    "CausalLM", "CheckpointError", "ModelArgs", "UnknownArchitectureError", "apply_chat_template",
    "build_tiny_model", "compute_logprobs", "enable_activation_checkpointing", "load_args", "load_model",
    "load_state_dict_into", "load_tokenizer", "logprobs_from_hidden", "maybe_compile", "save_model", "tiny_args",
    "tiny_tokenizer_path", "write_tiny_checkpoint",
]
