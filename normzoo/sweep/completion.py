"""Shell completion for zsh: ``eval "$(normzoo-train -sc install=zsh)"``.

Hydra 1.3 completes bash and fish with scripts of their own, but its zsh plugin prints the *bash*
script (``ZshCompletion.install`` delegates to ``BashCompletion``), which zsh cannot run as it is:
``[ a == b ]`` is an error in zsh and ``words=($COMP_LINE)`` does not split. This is a zsh
completion function that asks the same Hydra query (``-sc query=bash``: the candidates for the
last word of ``COMP_LINE``) and hands the candidates to ``compadd``. Hydra keeps ``-sc install=bash``
and ``install=fish``; only the zsh subcommands are answered here, before Hydra starts.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ZSH_FUNCTION", "zsh_completion"]

ZSH_FUNCTION = "_normzoo_hydra_completion"

_ZSH_INSTALL = """\
# {app}: zsh completion through Hydra's query (candidates for the word before the cursor)
(( $+functions[compdef] )) || {{ autoload -Uz compinit && compinit; }}
{fn}() {{
    local line="${{(j: :)words[1,CURRENT]}}"
    local -a candidates
    candidates=(${{=$(COMP_LINE="$line" COMP_POINT=${{#line}} ${{words[1]}} -sc query=bash 2>/dev/null)}})
    # a key or a group (norm=, data.): its value follows without a space
    compadd -S '' -- ${{(M)candidates:#*[=./]}}
    compadd -- ${{candidates:#*[=./]}}
}}
compdef {fn} {app}"""

_ZSH_UNINSTALL = """\
compdef -d {app}
unfunction {fn} 2>/dev/null"""


def _app_name() -> str:
    """The command a user types: ``normzoo-train`` (also for ``python -m normzoo.train``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "normzoo-train" if not name or name.endswith(".py") else name


def zsh_completion(argv: list[str]) -> str | None:
    """The zsh script that ``argv`` (``-sc install=zsh`` / ``-sc uninstall=zsh``) asks for; None
    for any other command line (Hydra answers it)."""
    if not {"-sc", "--shell-completion"} & set(argv):
        return None
    if "install=zsh" in argv:
        template = _ZSH_INSTALL
    elif "uninstall=zsh" in argv:
        template = _ZSH_UNINSTALL
    else:
        return None
    return template.format(app=_app_name(), fn=ZSH_FUNCTION)
