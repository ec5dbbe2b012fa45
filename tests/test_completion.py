"""Shell completion (issue 14, item 3): ``normzoo-train -sc install=bash|zsh|fish`` prints each
shell's own script, and the script, run by that shell, completes ``norm=groupn`` to
``norm=groupnorm`` through Hydra's query. The real-shell checks need zsh / fish installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from normzoo.sweep.completion import ZSH_FUNCTION, zsh_completion

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
APP = BIN / "normzoo-train"  # the console script: the name the scripts register
pytestmark = pytest.mark.skipif(not APP.exists(), reason="normzoo-train is not installed")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip


def install(shell: str) -> str:
    proc = subprocess.run([str(APP), "-sc", f"install={shell}"], env=_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def in_shell(*argv: str) -> str:
    proc = subprocess.run(list(argv), env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_only_the_zsh_subcommands_are_answered_before_hydra(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/normzoo-train", "-sc", "uninstall=zsh"])
    assert zsh_completion(["-sc", "install=bash"]) is None
    assert zsh_completion(["-sc", "query=zsh"]) is None  # Hydra's query, as bash's
    assert zsh_completion(["install=zsh"]) is None  # without -sc: an override (refused later)
    assert zsh_completion(["-sc", "uninstall=zsh"]).startswith("compdef -d normzoo-train\n")


def test_bash_gets_the_bash_script_and_it_completes() -> None:
    script = install("bash")
    assert "hydra_bash_completion()" in script and script.rstrip().endswith(" normzoo-train")
    line = "normzoo-train norm=groupn"
    probe = (f'eval "$(normzoo-train -sc install=bash)"; COMP_LINE="{line}"; '
             f"COMP_WORDS=({line}); COMP_CWORD=1; COMP_POINT=${{#COMP_LINE}}; "
             'hydra_bash_completion; echo "${COMPREPLY[@]}"')  # fmt: skip
    assert in_shell("bash", "-c", probe).split() == ["norm=groupnorm"]


def test_zsh_gets_a_zsh_script_and_it_completes(tmp_path: Path) -> None:
    script = install("zsh")
    assert "hydra_bash_completion" not in script  # Hydra's zsh plugin printed the bash script
    assert f"compdef {ZSH_FUNCTION} normzoo-train" in script and "compadd" in script
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed: the script's text is checked, not run")
    (tmp_path / "s.zsh").write_text(script)
    in_shell("zsh", "-n", str(tmp_path / "s.zsh"))
    # compdef/compadd exist inside a completion widget only: stand-ins that print their arguments
    probe = ('compdef() { print -r -- "compdef $*" }; compadd() { print -r -- "compadd $*" }; '
             f'source {tmp_path / "s.zsh"}; words=(normzoo-train norm=groupn); CURRENT=2; '
             f"{ZSH_FUNCTION}; words=(normzoo-train nor); CURRENT=2; {ZSH_FUNCTION}")  # fmt: skip
    lines = in_shell("zsh", "-f", "-c", probe).splitlines()
    assert "compadd -- norm=groupnorm" in lines  # a value: a space follows
    assert "compadd -S  -- norm. norm= norm_options." in lines  # keys: no space after them


def test_fish_gets_the_fish_script_and_it_completes() -> None:
    script = install("fish")
    assert "function hydra_fish_completion" in script
    assert "complete -c normzoo-train -x -a '(hydra_fish_completion)'" in script
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed: the script's text is checked, not run")
    probe = 'normzoo-train -sc install=fish | source; complete -C "normzoo-train norm=groupn"'
    assert in_shell("fish", "-c", probe).split() == ["norm=groupnorm"]
