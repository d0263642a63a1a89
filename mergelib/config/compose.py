"""conf/ + Hydra overrides -> a plain dict: the same compose call DVC's Hydra integration makes.

DVC (dvc/utils/hydra.py::compose_and_dump) runs initialize_config_dir + compose + OmegaConf.resolve and writes
OmegaConf.to_yaml to params.yaml; `compose_yaml` does exactly that, so a stage given overrides sees what
`dvc exp run -S` would have written. `python -m mergelib.config.compose [--check] [OVERRIDES]` rewrites
(or checks) params.yaml.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mergelib.config.textfile import CONFIG_LIMIT, read_text, yaml_documents
from mergelib.errors import ConfigError, did_you_mean

CONFIG_NAME = "config"
PARAMS_FILE = "params.yaml"


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.append(name)
        out.extend(_flat_keys(value, name + "."))
    return out


def _groups(conf_dir: Path) -> dict[str, list[str]]:
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(conf_dir.iterdir())
        if d.is_dir()
    }


def _check_overrides(overrides: Sequence[str], conf_dir: Path) -> None:
    """Reject unknown keys and group options with a message naming the key and the fix (Hydra's is multi-line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except OverrideParseException as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"override: {first}; write overrides as key=value, e.g. density=0.5") from None
    groups = _groups(conf_dir)
    base = None
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(
                f"override '{override.input_line}': a sweep (comma list) runs several configs; "
                "give one value, or use `dvc exp run --queue -S` for sweeps"
            )
        if key in groups:
            value = override.value()
            if value is not None and not override.is_delete() and str(value) not in groups[key]:
                raise ConfigError(
                    f"override '{override.input_line}': no '{value}' in conf/{key}/{did_you_mean(value, groups[key])}; "
                    f"choose one of: {', '.join(groups[key])}"
                )
            continue
        if override.is_add() or override.is_force_add():
            continue
        if base is None:
            from omegaconf import OmegaConf

            base = OmegaConf.to_container(_compose_raw((), conf_dir))
        known = _flat_keys(base)
        if key not in known:
            raise ConfigError(
                f"override '{override.input_line}': no key '{key}' in conf/{did_you_mean(key, known)}; "
                "see params.yaml for the keys"
            )


def _compose_raw(overrides: Sequence[str], conf_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise ConfigError(f"conf/: {' '.join(lines[:2])}") from None
    return cfg


def compose_yaml(overrides: Sequence[str] = (), conf_dir: str | Path = "conf") -> str:
    """The text DVC writes to params.yaml for these overrides."""
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir)
    if not (conf_dir / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"{conf_dir}/{CONFIG_NAME}.yaml: not found; run from the repository root")
    _check_overrides(overrides, conf_dir)
    return OmegaConf.to_yaml(_compose_raw(overrides, conf_dir))


def compose(overrides: Sequence[str] = (), conf_dir: str | Path = "conf") -> dict:
    """conf/ composed with Hydra `overrides` and resolved, as plain data."""
    return yaml.safe_load(compose_yaml(overrides, conf_dir))


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    """The composed config DVC tracks (params.yaml)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"{path}: cannot read it (No such file or directory); run from the repository root, "
            "or regenerate it with `python -m mergelib.config.compose`"
        )
    text = read_text(path, "params.yaml", ConfigError, CONFIG_LIMIT)
    docs = yaml_documents(text, f"{path} (regenerate it from conf/)", ConfigError)
    data = docs[0] if len(docs) == 1 else None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping; regenerate it with `python -m mergelib.config.compose`")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """Write params.yaml composed from conf/ (with overrides) and validated, or with --check report drift."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    overrides = [a for a in args if a != "--check"]
    try:
        text = compose_yaml(overrides)
        from mergelib.config.run import run_config  # late: pydantic is not needed to compose

        run_config(yaml.safe_load(text), source="config")  # never write a params.yaml the stages reject
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    target = Path(PARAMS_FILE)
    if check:
        if not target.is_file() or target.read_text() != text:
            print(f"{target} differs from conf/; run `python -m mergelib.config.compose`", file=sys.stderr)
            return 1
        print(f"{target} matches conf/")
        return 0
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
