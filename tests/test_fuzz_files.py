"""Every file a user hands us, filled with random bytes (not only random YAML): recipes, MoE configs, params.yaml,
lock files, config.json and tokenizer.json. Only our own one-line errors come out, each naming the file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelib.config.compose import load_params
from mergelib.config.recipe import load_recipe, load_recipes
from mergelib.errors import MergelibError
from mergelib.io.index import read_config
from mergelib.moe.config import load_moe_config
from mergelib.pipeline.fetch import read_lock
from mergelib.tokenizer.vocab import read_vocabulary

# reader, the file name it reads, and whether it takes the file (True) or its directory (False)
READERS = {
    "recipe": (load_recipe, "recipe.yml", True),
    "multi-document recipe": (load_recipes, "stages.yaml", True),
    "moe config": (load_moe_config, "moe.yml", True),
    "params.yaml": (load_params, "params.yaml", True),
    "lock file": (read_lock, "lock.json", True),
    "config.json": (read_config, "config.json", False),
    "tokenizer.json": (lambda d: read_vocabulary("m", d), "tokenizer.json", False),
}
blobs = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
    st.binary(max_size=40).map(lambda b: b"merge_method: linear\n# caf\xe9\n" + b),  # a Latin-1 comment
)


@pytest.mark.parametrize("kind", sorted(READERS))
def test_random_bytes_give_one_line_naming_the_file(kind):
    reader, name, takes_file = READERS[kind]

    @settings(max_examples=60)
    @given(blobs)
    def check(blob: bytes):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(blob)
            try:
                reader(path if takes_file else path.parent)
            except MergelibError as exc:
                message = str(exc)
                assert message and "\n" not in message
                assert str(path) in message or f"'{'m'}'" in message, message

    check()


@pytest.mark.parametrize("kind", ["recipe", "moe config", "params.yaml", "lock file"])
def test_non_utf8_names_the_byte_offset(tmp_path, kind):
    reader, name, _ = READERS[kind]
    path = tmp_path / name
    path.write_bytes(b"merge_method: linear  # caf\xe9\n")
    with pytest.raises(MergelibError, match=rf"{path}: .* is not UTF-8 text \(byte 0xe9 at offset 27\)"):
        reader(path)


@settings(max_examples=40)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_random_conf_overrides_give_one_line_config_errors(overrides):
    from mergelib.config.compose import compose
    from mergelib.errors import ConfigError

    try:
        compose(overrides, conf_dir=Path(__file__).resolve().parents[1] / "conf")
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


def test_a_checkpoint_given_as_a_recipe_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "model.safetensors"
    with open(big, "wb") as handle:
        handle.truncate(20 << 20)  # sparse: 20 MB without writing them
    with pytest.raises(MergelibError, match=r"model.safetensors: 21 MB is too large for the recipe"):
        load_recipe(big)
