"""`dlfs completion bash|zsh|fish`: tab completion for the word `dlfs`, its commands, and each Hydra command's
config groups, options and keys.

Hydra's own `-sc install=bash` completes one app: it asks the program for `-sc query=bash`, and `dlfs` is
several apps behind one word. Here the installed shell function asks `dlfs completion query` with the
shell's line in $COMP_LINE; the command in that line picks its config (train, eval, generate, reproduce)
and Hydra's completion machinery answers for it, one candidate a line. No torch is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from dlfs_cli.errors import DlfsError

HYDRA_APPS = {"train": "train", "eval": "eval", "generate": "generate", "reproduce": "reproduce"}
ARGPARSE_COMMANDS = {"runs": "dlfs_cli.runs", "diff": "dlfs_cli.diff"}  # modules with a _parser()

BASH = """_dlfs_completion() {
    local IFS=$'\\n'
    COMPREPLY=($(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" command dlfs completion query 2>/dev/null))
    COMPREPLY=($(compgen -W "${COMPREPLY[*]}" -- "${COMP_WORDS[COMP_CWORD]}"))
}
# `key=value` is one word to complete, as Hydra's own completion has it
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _dlfs_completion dlfs
"""
ZSH = "autoload -U +X bashcompinit && bashcompinit\n" + BASH
FISH = """function __dlfs_complete
    env COMP_LINE=(commandline -cp) dlfs completion query 2>/dev/null
end
complete -c dlfs -f -a '(__dlfs_complete)'
"""
SCRIPTS = {"bash": BASH, "zsh": ZSH, "fish": FISH}
USAGE = (
    "dlfs completion bash|zsh|fish prints the script; install it with: "
    'eval "$(dlfs completion bash)" (bash, in ~/.bashrc), eval "$(dlfs completion zsh)" (zsh, in ~/.zshrc), '
    "dlfs completion fish | source (fish)"
)


def completion(args: list[str], commands: list[str]) -> None:
    """`dlfs completion SHELL` prints the script; `dlfs completion query` answers the shell's function."""
    if args == ["query"]:
        print("\n".join(candidates(os.environ.get("COMP_LINE", "dlfs "), commands)))
        return
    if len(args) != 1 or args[0] not in SCRIPTS:
        raise DlfsError(USAGE)
    print(SCRIPTS[args[0]], end="")


def candidates(line: str, commands: list[str]) -> list[str]:
    """What may follow `line` (the whole line up to the cursor, `dlfs` first)."""
    words = line.split()
    new_word = line.endswith(" ")
    if len(words) < 2 or (len(words) == 2 and not new_word):  # the command itself
        typed = words[1] if len(words) == 2 else ""
        return [c for c in commands if c.startswith(typed)]
    command, rest = words[1], line.split(None, 2)[2] if len(words) > 2 else ""
    if command in ARGPARSE_COMMANDS:
        typed = "" if new_word else words[-1]
        return [o for o in _options(command) if o.startswith(typed)] if typed.startswith("-") or not typed else []
    if command not in HYDRA_APPS:
        return []
    return _hydra_candidates(HYDRA_APPS[command], rest)


def _options(command: str) -> list[str]:
    """The long options of an argparse command, read from its own parser."""
    import importlib

    parser = importlib.import_module(ARGPARSE_COMMANDS[command])._parser()
    return sorted(o for action in parser._actions for o in action.option_strings if o.startswith("--"))


def _hydra_candidates(config_name: str, rest: str) -> list[str]:
    """Hydra's completion of `rest` for one of dlfs's configs: groups (model=...), their options, keys."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.bash_completion import BashCompletion
    from hydra._internal.utils import create_config_search_path

    from dlfs_cli.config import conf_dir, register_configs

    register_configs()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))
    query: Callable[..., list[str]] = BashCompletion(loader)._query
    try:
        found = query(config_name=config_name, line=rest)
    except Exception:  # noqa: BLE001 - a half-typed line Hydra cannot parse: no candidates, never a traceback
        return []
    # the schemas are stored for the YAML files to extend (schema_train, ...): not options for the user
    return [c for c in found if not c.startswith("schema_")]
