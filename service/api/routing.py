"""Which loaded model serves a request, from its ``model`` and ``paradigm`` fields."""

from __future__ import annotations

from service.common.errors import InvalidRequest, UnknownModel, shorten

PARADIGMS = ("autoregressive", "diffusion")


def resolve_model(paradigms: dict[str, str], model: object, paradigm: object) -> str:
    """Pick the model from ``{name: paradigm}``; raises ``UnknownModel`` or ``InvalidRequest``."""
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    if paradigm is not None and paradigm not in PARADIGMS:
        raise InvalidRequest(f"'paradigm' must be one of {list(PARADIGMS)}")
    if model is not None:
        if model not in paradigms:
            raise UnknownModel(f"model {shorten(model)!r} is not loaded; available: {sorted(paradigms)}")
        if paradigm is not None and paradigms[model] != paradigm:
            raise InvalidRequest(f"model {model!r} is {paradigms[model]}, but the request says paradigm {paradigm!r}")
        return model
    candidates = [name for name, kind in paradigms.items() if paradigm in (None, kind)]
    if paradigm is None and len({paradigms[name] for name in candidates}) > 1:
        raise InvalidRequest("give 'model' or 'paradigm': several paradigms are served")
    if not candidates:
        raise UnknownModel(f"no {paradigm} model is loaded" if paradigm else "no model is loaded")
    return candidates[0]
