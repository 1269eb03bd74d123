"""A model as other tools take it: a Hugging Face folder (`gpt2.export.hf`, what a run's `model/` is, loaded by
`transformers`) or one GGUF file (`gpt2.export.gguf`, run by llama.cpp and what builds on it).

`save_model_folder` is re-exported here because training writes every run's `model/` with it; the GGUF writer is
imported by its module's name, so that training never imports the `gguf` package it needs.
"""

from gpt2.export.hf import Exportable, save_model_folder

__all__ = ["Exportable", "save_model_folder"]
