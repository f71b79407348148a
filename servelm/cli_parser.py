"""The argument parser of `servelm`'s subcommands: an unknown flag is reported by the
subcommand itself, under its own usage and with the closest flag it knows. argparse leaves a
subcommand's leftovers to the top-level parser, which prints `usage: servelm [-h] ...
{generate,serve,chat,bench}` and nothing about the subcommand's flags."""
from __future__ import annotations

import argparse
import difflib
from typing import Any, Iterable, Optional, Sequence


class SubcommandParser(argparse.ArgumentParser):
    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> Any:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(unknown_arguments_message(extras, self._option_string_actions))
        return ns, extras


def unknown_arguments_message(extras: list[str], known: Iterable[str]) -> str:
    """'unrecognized arguments: --max-modl-len 5 (did you mean --max-model-len?)'."""
    known = [k for k in known if k.startswith("--")]
    flags = [a.split("=", 1)[0] for a in extras if a.startswith("--")]
    hints = {f: close[0] for f in flags
             if (close := difflib.get_close_matches(f, known, n=1, cutoff=0.8))}
    if len(hints) == 1 and len(flags) == 1:
        hint = f" (did you mean {next(iter(hints.values()))}?)"
    elif hints:
        hint = " (did you mean " + ", ".join(f"{k} for {f}" for f, k in hints.items()) + "?)"
    else:
        hint = ""
    return f"unrecognized arguments: {' '.join(extras)}{hint}"
