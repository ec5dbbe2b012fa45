"""The command line, checked before Hydra starts: an unknown ``norm=`` / ``experiment=`` /
``model=`` / ``data=`` / ``optim=`` value (with the closest name), a glob that matches nothing,
unknown keys and mistyped values (:func:`normzoo.config.validate.check_override`, naming
what is allowed); Hydra's own messages name only the key."""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from normzoo.config.schema import CONF_DIR, NORM_RESERVED_KEYS, norm_choices
from normzoo.config.validate import check_override, suggest_norm
from normzoo.errors import ConfigError
from normzoo.registry import UnknownNormError, get_norm

__all__ = ["check_argv", "experiment_choices", "group_choices"]

_SWEEP_SYNTAX = "()[]{}$"
_COMPLETION = {
    "-sc",
    "--shell-completion",
}  # choice(...), glob(...), interpolations: checked by SweepGuard


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
    if _COMPLETION & set(argv):
        return  # `-sc install=bash`: Hydra's completion, whose argument is not an override
    choices = set(norm_choices())
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    _check_experiment(argv, overrides)
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
    _check_norm_keys(overrides)
    for arg in argv:
        if not arg.startswith("norm="):
            continue
        value = arg.split("=", 1)[1]
        if any(ch in value for ch in _SWEEP_SYNTAX):
            continue
        for name in value.split(","):
            if name.strip() and name.strip() not in choices:
                raise ConfigError(suggest_norm(name.strip()))


def _config_dirs(argv: list[str], overrides: list[str]) -> list[Path]:
    """The user config dirs of the command line (``--config-dir``/``-cd``, ``hydra.searchpath``)."""
    dirs = [CONF_DIR]
    for i, arg in enumerate(argv):
        if arg in ("-cd", "--config-dir") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    for arg in overrides:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            text = arg.split("=", 1)[1].strip("[]")
            for item in text.split(","):
                item = item.strip().strip("'\"")
                if item.startswith("file://"):
                    dirs.append(Path(item[len("file://") :]))
                elif item.startswith("pkg://") or not item:
                    return []  # a package's dirs: not listed here, Hydra decides
                else:
                    dirs.append(Path(item))
    return dirs


def experiment_choices(dirs: list[Path]) -> list[str]:
    """The ``experiment`` options in ``dirs`` (``<dir>/experiment/*.yaml``)."""
    return group_choices("experiment", dirs)


def group_choices(group: str, dirs: list[Path]) -> list[str]:
    """The options of a config group in ``dirs`` (``<dir>/<group>/*.yaml``; ``norm``: also the
    registry's names and aliases)."""
    found = {p.stem for d in dirs for p in (d / group).glob("*.yaml")}
    return sorted(found | set(norm_choices())) if group == "norm" else sorted(found)


#: the config groups whose ``<group>=<option>`` is checked here (a misspelt ``experiment`` would
#: silently run the default: ``optional experiment``)
_CHECKED_GROUPS = ("experiment", "model", "data", "optim")
_YOURS = " (your own: --config-dir DIR with DIR/{group}/<name>.yaml)"


def _check_experiment(argv: list[str], overrides: list[str]) -> None:
    """``<group>=<unknown>`` for the groups of :data:`_CHECKED_GROUPS` is refused with the
    closest option (Hydra's "Could not find" names none), and so is a ``glob(...)`` over any group
    that matches no option."""
    dirs = _config_dirs(argv, overrides)
    if not dirs:
        return
    for arg in overrides:
        group, _, value = arg.lstrip("+").partition("=")
        if group not in (*_CHECKED_GROUPS, "norm"):
            continue
        choices = group_choices(group, dirs)
        if value.startswith("glob("):
            _check_glob(arg.lstrip("+"), group, choices)
            continue
        if group == "norm" or any(ch in value for ch in _SWEEP_SYNTAX):
            continue  # norm=: checked with the registry's hint below
        for name in (v.strip() for v in value.split(",")):
            if name and name not in choices:
                close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
                hint = f" Did you mean {group}={close[0]}?" if close else ""
                raise ConfigError(
                    f"unknown {group} {name!r} ({group}={name}).{hint} Choices: "
                    f"{', '.join(choices)}{_YOURS.format(group=group)}"
                )


def _check_glob(arg: str, group: str, choices: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    try:
        value = OverridesParser.create().parse_override(arg).value()
    except Exception:
        return  # Hydra's own parse error follows
    if isinstance(value, Glob) and not value.filter(choices):
        raise ConfigError(
            f"{arg} matches no {group} option, so the sweep would have no runs. Choices: "
            f"{', '.join(choices)}"
        )


def _chosen_norms(overrides: list[str]) -> list[str] | None:
    """The norms of the command line (``norm=a,b``; the default's without one); None: a glob."""
    values = [a.split("=", 1)[1] for a in overrides if a.startswith("norm=")]
    if not values:
        if any(a.startswith("experiment=") for a in overrides):
            return None  # a study may sweep norms: SweepGuard checks each job
        defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults") or []
        return [str(d["norm"]) for d in defaults if isinstance(d, DictConfig) and "norm" in d]
    if any(ch in values[-1] for ch in _SWEEP_SYNTAX):
        return None
    return [v.strip() for v in values[-1].split(",") if v.strip()]


def _check_norm_keys(overrides: list[str]) -> None:
    """``norm.<key>=`` (not ``+norm.``) must name an option of the chosen norm(s): normzoo's
    "did you mean" instead of Hydra's "use +norm.<key>" hint."""
    names = _chosen_norms(overrides)
    if names is None:
        return  # a glob: every job is checked by SweepGuard
    try:
        specs = [get_norm(n) for n in names]
    except UnknownNormError:
        return  # the unknown norm= is refused below, with its own hint
    accepted = sorted(set(NORM_RESERVED_KEYS).union(*(s.options() for s in specs)))
    for arg in overrides:
        key = arg.split("=", 1)[0]
        if not key.startswith("norm.") or "." in key[5:]:
            continue
        option = key[5:]
        if option not in accepted:
            which = ", ".join(s.name for s in specs)
            close = difflib.get_close_matches(option, accepted, n=1, cutoff=0.6)
            hint = f" Did you mean norm.{close[0]}?" if close else ""
            raise ConfigError(
                f"{key}: norm={which} has no option {option!r}.{hint} It accepts: "
                f"{', '.join(accepted)}"
            )


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
