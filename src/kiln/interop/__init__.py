"""Interoperability with other model formats (Hugging Face transformers: kiln.interop.hf)."""
