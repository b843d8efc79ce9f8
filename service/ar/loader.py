"""Load an HF-format causal LM folder (config, safetensors, tokenizer.json) into our model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from service.ar.models import CausalLM, create_model

SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass
class LoadedCausalLM:
    model: CausalLM
    tokenizer: Tokenizer
    eos_token_ids: set[int]
    bos_token_id: int | None
    chat_template: str | None
    max_model_len: int
    name_or_path: str
    config: dict[str, Any] = field(default_factory=dict)
    # tokenizer_config's special-token strings, which chat templates see as bos_token / eos_token
    bos_token: str | None = None
    eos_token: str | None = None


def load_causal_lm(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedCausalLM:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    config = read_json(path / "config.json")
    generation_config = read_json(path / "generation_config.json", required=False)
    tokenizer_config = read_json(path / "tokenizer_config.json", required=False)
    tokenizer = _load_tokenizer(path)

    model = create_model(config, device, dtype)
    model.load_weights(iter_safetensors(weight_files(path)))

    return LoadedCausalLM(
        model=model,
        tokenizer=tokenizer,
        eos_token_ids=_eos_token_ids(config, generation_config, tokenizer_config, tokenizer),
        bos_token_id=_bos_token_id(config, generation_config, tokenizer_config, tokenizer),
        chat_template=_chat_template(path, tokenizer_config),
        max_model_len=model.max_position_embeddings,
        name_or_path=str(path),
        config=config,
        bos_token=_special_token(tokenizer_config, "bos_token"),
        eos_token=_special_token(tokenizer_config, "eos_token"),
    )


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found")
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return content


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: the single file or every shard of the index."""
    single = path / SINGLE_WEIGHTS_FILE
    if single.is_file():
        return [single]
    index_path = path / SHARDED_WEIGHTS_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{path} has neither {SINGLE_WEIGHTS_FILE} nor {SHARDED_WEIGHTS_INDEX} "
            "(only safetensors checkpoints are supported)"
        )
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map")
    shards = [path / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {index_path} is missing")
    return shards


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, so a checkpoint is never fully in memory."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _load_tokenizer(path: Path) -> Tokenizer:
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} not found (a fast tokenizer.json is required)")
    try:
        return Tokenizer.from_file(str(tokenizer_path))
    except Exception as error:  # the tokenizers library raises a bare Exception
        raise ValueError(f"cannot load {tokenizer_path}: {error}") from error


def _token_ids(value: Any) -> list[int]:
    """An eos/bos id field: int, list of ints or null."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(item) for item in value]


def _special_token(tokenizer_config: dict[str, Any], key: str) -> str | None:
    """A special token named in tokenizer_config (a string or an AddedToken dict)."""
    token = tokenizer_config.get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _special_token_id(tokenizer_config: dict[str, Any], key: str, tokenizer: Tokenizer) -> int | None:
    token = _special_token(tokenizer_config, key)
    return None if token is None else tokenizer.token_to_id(token)


def _eos_token_ids(
    config: dict[str, Any],
    generation_config: dict[str, Any],
    tokenizer_config: dict[str, Any],
    tokenizer: Tokenizer,
) -> set[int]:
    # Union of all sources: chat models often name their end-of-turn token in only one of them.
    ids = set(_token_ids(generation_config.get("eos_token_id")))
    ids.update(_token_ids(config.get("eos_token_id")))
    tokenizer_eos = _special_token_id(tokenizer_config, "eos_token", tokenizer)
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return ids


def _bos_token_id(
    config: dict[str, Any],
    generation_config: dict[str, Any],
    tokenizer_config: dict[str, Any],
    tokenizer: Tokenizer,
) -> int | None:
    # The tokenizer's own setting wins, including an explicit null (e.g. GPT-2 style tokenizers).
    if "bos_token" in tokenizer_config:
        return _special_token_id(tokenizer_config, "bos_token", tokenizer)
    for source in (generation_config, config):
        ids = _token_ids(source.get("bos_token_id"))
        if ids:
            return ids[0]
    return None


def _chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str | None:
    # transformers 5 saves the template as its own file, which takes priority.
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
        by_name = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = by_name.get("default")
    return template if isinstance(template, str) else None
