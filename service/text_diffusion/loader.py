"""The masked-diffusion text folder: ``config.json`` (model_type ``genserve_mdlm``), ``model.safetensors``, tokenizer.

Layout (see ``models/README.md``):

    config.json              {"model_type": "genserve_mdlm", "architectures": ["MaskedDiffusionLM"], sizes...,
                              "mask_token_id", "eos_token_id", "noise_schedule": "linear"}
    model.safetensors        float32 weights named as MaskedDiffusionLM's state_dict (output embedding tied)
    tokenizer.json           a ``tokenizers`` tokenizer that includes the ``[MASK]`` special token
    tokenizer_config.json    transformers' view of it (mask_token, eos_token)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from service.text_diffusion.model import ARCHITECTURE, MODEL_TYPE, MaskedDiffusionConfig, MaskedDiffusionLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MASK_TOKEN = "[MASK]"


@dataclass
class LoadedMaskedDiffusionLM:
    model: MaskedDiffusionLM
    tokenizer: Tokenizer
    mask_token_id: int
    eos_token_id: int
    config: MaskedDiffusionConfig


def is_masked_diffusion_folder(path: str | Path) -> bool:
    """True when ``path`` holds a config.json whose model_type is ours (check this before the HF causal-LM test)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE and \
        ARCHITECTURE in (config.get("architectures") or [])


def read_config(path: str | Path) -> MaskedDiffusionConfig:
    return MaskedDiffusionConfig.from_json_dict(json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8")))


def load_masked_diffusion_lm(path: str | Path, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32) -> LoadedMaskedDiffusionLM:
    """The model (eval mode, no grad), its tokenizer and special ids; raises ValueError on an inconsistent folder."""
    folder = Path(path)
    if not is_masked_diffusion_folder(folder):
        raise ValueError(f"{folder} is not a masked-diffusion text folder (config.json model_type {MODEL_TYPE!r})")
    config = read_config(folder)
    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    if tokenizer.token_to_id(MASK_TOKEN) != config.mask_token_id:
        raise ValueError(f"tokenizer's {MASK_TOKEN} id {tokenizer.token_to_id(MASK_TOKEN)} != config mask_token_id "
                         f"{config.mask_token_id}")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, the model {config.vocab_size}")
    model = MaskedDiffusionLM(config, device=device, dtype=dtype)
    state = load_file(str(folder / WEIGHTS_FILE), device=str(torch.device(device)))
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(f"weights mismatch: missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]}")
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()})
    model.eval().requires_grad_(False)
    return LoadedMaskedDiffusionLM(model, tokenizer, config.mask_token_id, config.eos_token_id, config)


def save_masked_diffusion_lm(model: MaskedDiffusionLM, tokenizer: Tokenizer, path: str | Path) -> None:
    """Write config.json, model.safetensors (float32) and the tokenizer files into ``path``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n", encoding="utf-8")
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(str(folder / TOKENIZER_FILE))
    eos_token = tokenizer.id_to_token(config.eos_token_id)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_token, "eos_token": eos_token, "pad_token": eos_token, "unk_token": None,
        "mask_token": MASK_TOKEN,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    special_tokens = {"bos_token": eos_token, "eos_token": eos_token, "pad_token": eos_token, "mask_token": MASK_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n", encoding="utf-8")
