"""The main job's command line for people: ``--help`` with every config field, one-line errors.

``main.py`` stays short: it hands its argv to ``parse_flags`` (absl's ``flags_parser`` hook), which

  * answers ``--help`` / ``-h`` with the flags and every config field, its value in the chosen
    ``--config`` file and the comment that documents it in ``configs/default.py``, exit code 0;
  * checks ``--config`` (the file exists and loads) and each ``--config.<field>=<value>`` (the
    field exists) before absl parses them, so a typo is one line naming the flag and the closest
    existing names (difflib) instead of three chained tracebacks; exit code 2;
  * lets a config file import its siblings (``from configs import default``) from any directory.

``fail`` prints such a line; the traceback is behind ``--verbosity=1``.
"""

from __future__ import annotations

import ast
import difflib
import glob
import importlib.util
import io
import os
import sys
import tokenize
from collections.abc import Sequence
from typing import Any, NoReturn

USAGE_ERROR = 2  # Exit code of a command-line mistake (runtime errors exit 1).
HELP_FLAGS = ("--help", "-h", "--helpshort", "-?", "--helpfull")
TRACEBACK_HINT = "--verbosity=1 shows the traceback"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_line(message: str, hint: bool = True) -> str:
    """``error: message`` on one line, whatever the exception's formatting, with the
    traceback hint; ``main`` and the ``facenet-jax`` CLI both print their errors so."""
    line = " ".join(str(message).split())
    return f"error: {line}" + (f" ({TRACEBACK_HINT})" if hint else "")


def fail(message: str, code: int = 1, hint: bool = True) -> NoReturn:
    """Prints ``error_line(message)`` on stderr and exits with ``code``."""
    print(error_line(message, hint), file=sys.stderr)
    sys.exit(code)


def verbose(argv: Sequence[str] | None = None) -> bool:
    """Whether --verbosity / -v asks for DEBUG (>= 1): then errors keep their traceback."""
    argv = sys.argv if argv is None else argv
    value = _flag_value(argv, "verbosity") or _flag_value(argv, "v")
    try:
        return value is not None and int(value) >= 1
    except ValueError:
        return False


# ----------------------------------------------------------------------------- config files


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` (the last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        for prefix in (f"--{name}=", f"-{name}="):
            if arg.startswith(prefix):
                value = arg[len(prefix) :]
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def make_importable(config_path: str) -> None:
    """Puts the folder above a config package (``configs/__init__.py``) on sys.path, so
    ``from configs import default`` inside a config file works from any working directory."""
    folder = os.path.dirname(os.path.abspath(config_path))
    if os.path.exists(os.path.join(folder, "__init__.py")):
        parent = os.path.dirname(folder)
        if parent not in sys.path:
            sys.path.insert(0, parent)


def load_config_file(path: str) -> Any:
    """``get_config()`` of a config file, or a one-line exit naming --config."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        names = sorted(glob.glob(os.path.join(folder, "*.py")))
        if not names and os.path.isdir(os.path.join(REPO, "configs")):
            names = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        what = "is a folder" if os.path.isdir(path) else "no such file"
        fail(
            f"--config={path}: {what}"
            + (f"; did you mean {' or '.join(close)}?" if close else "")
            + (
                f" (config files there: {', '.join(map(os.path.basename, names))})" if names else ""
            ),
            USAGE_ERROR,
            hint=False,
        )
    make_importable(path)
    try:
        spec = importlib.util.spec_from_file_location("_facenet_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # noqa: BLE001 -- any failure is reported as the file's.
        if verbose():
            raise
        fail(f"--config={path}: cannot load it: {type(e).__name__}: {e}", USAGE_ERROR)


def field_names(config: Any, prefix: str = "") -> list[str]:
    """Every leaf field of a ConfigDict as a dotted name: ``["seed", "data.source", ...]``."""
    names = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and not isinstance(value, str):
            names.extend(field_names(value, f"{name}."))
        else:
            names.append(name)
    return names


def check_overrides(argv: Sequence[str], config: Any, flag: str = "config") -> None:
    """Exits naming the first ``--config.<field>`` whose field the config does not have."""
    fields = field_names(config)
    sections = {name.rsplit(".", 1)[0] for name in fields if "." in name}
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        name = arg[len(flag) + 3 :].split("=", 1)[0]
        if name in fields or name in sections:
            continue
        close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
        suggestion = (
            "did you mean " + " or ".join(f"--{flag}.{c}" for c in close) + "?"
            if close
            else "`--help` lists the fields"
        )
        fail(f"--{flag}.{name}: the config has no field {name!r}; {suggestion}", USAGE_ERROR, False)


def preflight(argv: Sequence[str], flag: str = "config") -> Any:
    """Checks --config and its overrides before absl parses them; returns the loaded config."""
    path = _flag_value(argv, flag)
    if path is None:
        return None  # absl reports the missing required flag.
    config = load_config_file(path)
    check_overrides(argv, config, flag)
    return config


# ----------------------------------------------------------------------------- --help


def field_comments(default_path: str | None = None) -> dict[str, str]:
    """{"train.margin": "alpha in ...", ...}: the end-of-line comments of configs/default.py.

    Reads assignments ``<alias>.<field> = value  # comment`` where an alias was bound by
    ``alias = config.<section> = ml_collections.ConfigDict()`` (``config`` itself is the root).
    """
    default_path = default_path or os.path.join(REPO, "configs", "default.py")
    if not os.path.exists(default_path):
        return {}
    with open(default_path) as f:
        source = f.read()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments.setdefault(token.start[0], token.string.lstrip("#").strip())
    aliases: dict[str, str] = {"config": ""}
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign):
            continue
        dotted = [_dotted(t, aliases) for t in node.targets]
        names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        section = next((d for d in dotted if d), None)
        if section is not None and names:  # data = config.data = ConfigDict()
            for name in names:
                aliases[name] = section
            continue
        for name in dotted:
            if name:
                lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                comment = next((comments[i] for i in lines if i in comments), "")
                out[name] = comment
    return out


def _dotted(target: ast.expr, aliases: dict[str, str]) -> str | None:
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        base = aliases.get(target.value.id)
        if base is not None:
            return f"{base}.{target.attr}" if base else target.attr
    return None


def config_help(config: Any, config_path: str | None) -> str:
    """The config part of --help: every field with its value and comment."""
    default_path = None
    if config_path:
        candidate = os.path.join(os.path.dirname(os.path.abspath(config_path)), "default.py")
        default_path = candidate if os.path.exists(candidate) else None
    comments = field_comments(default_path)
    names = field_names(config)
    values = {name: _get(config, name) for name in names}
    width = min(46, max(len(f"{n} = {values[n]!r}") for n in names) + 2)
    source = config_path or "configs/default.py"
    lines = [
        f"Config fields (values from {source}); override any with --config.<field>=<value>:",
    ]
    for name in names:
        left = f"  {name} = {values[name]!r}"
        comment = comments.get(name, "")
        if comment and len(left) > width:
            lines.append(left)
            lines.append(" " * (width + 2) + comment)
        else:
            lines.append(f"{left:<{width + 2}}{comment}".rstrip())
    return "\n".join(lines)


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def print_help(argv: Sequence[str], doc: str, flags_help: str) -> NoReturn:
    """Prints the usage, the flags and the config fields on stdout; exits 0."""
    path = _flag_value(argv, "config")
    if path is not None and os.path.isfile(path):
        config = load_config_file(path)
    else:
        default = os.path.join(REPO, "configs", "default.py")
        config = load_config_file(default) if os.path.exists(default) else None
        path = None
    print(doc.strip())
    print()
    print("Flags:")
    print(flags_help)
    if config is not None:
        print()
        print(config_help(config, path))
    sys.exit(0)
