"""Every ``train.py``, ``sample.py``, ``evaluate.py`` and ``export.py`` command line the README shows composes with
the shipped configs: a renamed key or a group option that went away fails here, not in a user's terminal."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO, compose_cfg

SCRIPTS = {"train": "train", "sample": "sample", "evaluate": "evaluate", "export": "export"}
# python train.py, ddpm-train; torchrun [its flags] train.py; srun [its flags] python train.py
ENTRY = re.compile(
    r"^(?:(?:srun(?: -\S+)* )?python3? (?:\S*/)?(train|sample|evaluate|export)\.py|ddpm-(train|sample|evaluate|export)"
    r"|torchrun(?: -\S+)* (?:\S*/)?(train|sample|evaluate|export)\.py)$"
)
OPTIONAL = re.compile(r"\[\w[\w.]*=.*\]")  # [key=value]: an optional argument, composed as well
OWN_CONFIGS = ("experiment=mine", "experiment=my_run")  # the README's example of a user's own config folder


def readme_commands() -> list[tuple[int, str, list[str]]]:
    """(line number, config name, overrides) of every command in the README's bash blocks."""
    found, in_bash, pending = [], False, ""
    for number, line in enumerate((REPO / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = line.strip() in ("```bash", "```sh", "```console") and not in_bash
            continue
        if not in_bash:
            continue
        line = pending + re.sub(r"<[^>]*>", "PLACEHOLDER", line.split(" #")[0].rstrip())
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        for command in re.split(r"\s*(?:&&|;)\s*", line):
            words = shlex.split(command) if command.strip() else []
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            for i in range(len(words)):
                head = " ".join(words[: i + 1])
                match = ENTRY.match(head)
                if match:
                    args = [w for w in words[i + 1 :] if not w.startswith("-")]  # -m, --cfg job: Hydra's flags
                    overrides = [w[1:-1] if OPTIONAL.fullmatch(w) else w for w in args]
                    found.append((number, SCRIPTS[next(g for g in match.groups() if g)], overrides))
                    break
    return found


def placeholders_filled(overrides: list[str]) -> list[str]:
    """``key=<...>`` (PLACEHOLDER here), ``key=...`` and the upper-case letters the README uses for numbers get a
    stand-in value."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if value in ("...", "N", "K", "S") or "PLACEHOLDER" in value:
            value = "1" if value in ("N", "K", "S") else "placeholder"
        out.append(f"{key}={value}")
    return out


COMMANDS = [c for c in readme_commands() if not any(own in c[2] for own in OWN_CONFIGS)]


def test_the_readme_shows_commands_of_every_entry_point():
    assert {name for _, name, _ in COMMANDS} == set(SCRIPTS.values()), COMMANDS
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("number,name,overrides", COMMANDS, ids=[f"README:{c[0]}" for c in COMMANDS])
def test_every_readme_command_composes(number, name, overrides, tmp_path):
    compose_cfg(name, placeholders_filled(overrides), tmp_path)
