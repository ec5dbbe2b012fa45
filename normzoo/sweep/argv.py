"""The command line, checked before Hydra starts: an unknown ``norm=`` value (with the closest
name), unknown keys and mistyped values (:func:`normzoo.config.validate.check_override`, naming
what is allowed); Hydra's own messages name only the key."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from normzoo.config.schema import CONF_DIR, norm_choices
from normzoo.config.validate import check_override, suggest_norm
from normzoo.errors import ConfigError

__all__ = ["check_argv"]

_SWEEP_SYNTAX = "()[]{}$"  # choice(...), glob(...), interpolations: checked by SweepGuard


def _candidate_models(overrides: list[str]) -> tuple[str, list[str | None]]:
    """(the ``model=`` value, the models every ``model.*`` key must fit; None: any model)."""
    models = [a.split("=", 1)[1] for a in overrides if a.startswith("model=")]
    if not models:  # the model a study or the defaults choose
        studies = [a.split("=", 1)[1] for a in overrides if a.startswith("experiment=")]
        models = [_default_model(studies[-1] if studies else None)]
    chosen = models[-1] or ""
    if not chosen or any(ch in chosen for ch in _SWEEP_SYNTAX):
        return chosen, [None]
    return chosen, [m.strip() for m in chosen.split(",") if m.strip()] or [None]


def check_argv(argv: list[str]) -> None:
    """Refuse a bad command line before Hydra starts.

    Raises:
        ConfigError: naming the key or the norm, and what is allowed.
    """
    choices = set(norm_choices())
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    chosen, candidates = _candidate_models(overrides)
    for arg in overrides:  # model=cnn,mlp: every model.* key must fit every model of the sweep
        for model in candidates:
            try:
                check_override(arg, model)
            except ConfigError as exc:
                if len(candidates) < 2:
                    raise
                raise ConfigError(
                    f"{exc} (the sweep over model={chosen} applies it to every model)"
                ) from None
    for arg in argv:
        if not arg.startswith("norm="):
            continue
        value = arg.split("=", 1)[1]
        if any(ch in value for ch in _SWEEP_SYNTAX):
            continue
        for name in value.split(","):
            if name.strip() and name.strip() not in choices:
                raise ConfigError(suggest_norm(name.strip()))


def _default_model(study: str | None) -> str | None:
    """The ``model`` option the defaults lists choose (a study's ``override /model`` first)."""
    files = ([CONF_DIR / "experiment" / f"{study}.yaml"] if study else []) + [
        CONF_DIR / "config.yaml"
    ]
    for path in files:
        try:
            defaults = OmegaConf.load(path).get("defaults") or []
        except Exception:
            continue
        for entry in defaults:
            if isinstance(entry, DictConfig):
                for key, value in entry.items():
                    if str(key).removeprefix("override ").strip("/") == "model":
                        return str(value)
    return None
