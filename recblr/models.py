"""The model registry and the one checkpoint format every model shares.

Protocol (what train.py and evaluate.py rely on; see `recblr.base.SequentialRecommender`):
- a frozen config dataclass with `n_items`; `dataclasses.asdict(config)` is what gets logged and saved;
- `model.item_embedding`: nn.Embedding(n_items + 1, D, padding_idx=0), also the output table (training's loss,
  `recblr.loss.linear_cross_entropy`, reads its weight: scores are hidden @ weight.T for every model);
- `model(items (B, T) right-padded with 0) -> hidden (B, T, D)`, causal;
- `model.scores(hidden (..., D)) -> (..., n_items + 1)`, and `model.top_k(hidden (B, D), k) -> (items, scores)`,
  the k best items without the padding row and without making those scores (what serving and recommend use);
- recurrent models add `allocate_state(batch_size, device)` and `step(items (B,), state, active=None) -> hidden
  (B, D)`, which advances the state in place (only the rows where active (B,) bool is True, when given).
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import torch

from recblr.base import SequentialRecommender
from recblr.gru4rec import GRU4Rec, GRU4RecConfig
from recblr.lrurec import LRURec, LRURecConfig
from recblr.model import RecBLR, RecBLRConfig
from recblr.popularity import Popularity, PopularityConfig
from recblr.sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type, type[SequentialRecommender]]] = {
    "recblr": (RecBLRConfig, RecBLR),
    # the baselines of the paper's Table 1, through the same training and evaluation
    "sasrec": (SASRecConfig, SASRec),
    "gru4rec": (GRU4RecConfig, GRU4Rec),
    "lrurec": (LRURecConfig, LRURec),
    "pop": (PopularityConfig, Popularity),
}


def config_fields(name: str) -> set[str]:
    """The fields of model `name`'s config that overrides may set (n_items comes from the data)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return {f.name for f in dataclasses.fields(MODELS[name][0])} - {"n_items"}


def build(name: str, n_items: int, **overrides) -> SequentialRecommender:
    """A fresh model `name` over items 1..n_items, config defaults replaced by `overrides`."""
    fields = config_fields(name)
    config_cls, model_cls = MODELS[name]
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"{name} has no config field(s) {sorted(unknown)}; fields: {sorted(fields)}")
    types = typing.get_type_hints(config_cls)
    overrides = {key: typed(f"{name}.{key}", value, types[key]) for key, value in overrides.items()}
    return model_cls(config_cls(n_items=n_items, **overrides))


def typed(what: str, value, kind: type):
    """value as a config field of type `kind` (int, float, bool, str): an int passes as a float, nothing else
    converts, so `use_conv="False"` or `n_layers=1.5` is an error instead of a model built otherwise than asked."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    expected = "true or false" if kind is bool else f"an {kind.__name__}" if kind is int else f"a {kind.__name__}"
    raise ValueError(f"{what} must be {expected}, got {value!r}")


def model_name(model: SequentialRecommender) -> str:
    for name, (_, model_cls) in MODELS.items():
        if type(model) is model_cls:
            return name
    raise ValueError(f"{type(model).__name__} is not in the registry")


def save(model: SequentialRecommender, path: Path, **extra) -> Path:
    """Write {"model", "config", "state_dict", **extra}: plain types only, so weights_only loading works."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": model_name(model), "config": dataclasses.asdict(model.config),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # a run killed mid-write leaves the previous file intact
    return path


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; "cpu", "cuda" or "cuda:N" as given, where it exists."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: {torch.cuda.device_count()} CUDA GPU(s) visible here; try auto or cpu")
    return device


def load(path: Path, map_location: str | torch.device = "cpu") -> SequentialRecommender:
    """The model saved by `save`, in eval mode; the extra keys are in `load_blob`."""
    blob = load_blob(path, map_location)
    config_cls, model_cls = MODELS[blob["model"]]
    model = model_cls(config_cls(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def trained_max_len(path: Path) -> int | None:
    """The window (most recent items) `fit` trained the saved model on: rank it with the same; None for a
    model saved outside fit."""
    return load_blob(path).get("train", {}).get("max_len")


def load_blob(path: Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved model here")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not one of its archives
        raise ValueError(f"{path}: not a model saved by recblr ({type(err).__name__}: {err})"[:500]) from None
    if not isinstance(blob, dict) or blob.get("model") not in MODELS:
        found = blob.get("model") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path}: not a model saved by recblr (model {found!r}; the registry: {sorted(MODELS)})")
    return blob
