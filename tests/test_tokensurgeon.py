"""Tokenizer transplant (`mergelib tokensurgeon`): two tiny Llamas with byte-level BPE vocabularies trained on
different word lists (overlapping in part). Their embedding and untied lm_head rows share a hidden structure: each
token's row is a fixed linear map of a latent vector computed from its bytes, plus noise, a different map per model
(what two models trained on similar text look like to a linear probe). So a donor-space combination of shared
tokens that rebuilds a token's donor row should rebuild its model row too, which is what OMP relies on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergelib.cli import main
from mergelib.errors import InputModelError, OutputError, RecipeError
from mergelib.tokenizer import approximate as approx
from mergelib.tokenizer.transplant import (
    TransplantOptions,
    build_matrix,
    match_tokens,
    token_bytes,
    transplant_tokenizer,
)
from mergelib.tokenizer.vocab import read_vocabulary

LATENT = 16
HIDDEN = 32
MODEL_SPECIALS = ["<s>", "</s>"]
DONOR_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]


def _words(seed: int, n: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "go", "shu", "ri", "an", "el", "or"]
    out = []
    for _ in range(n):
        parts = torch.randint(len(syllables), (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
        out.append("".join(syllables[int(i)] for i in parts))
    return out


SHARED_WORDS = _words(0, 60)
MODEL_WORDS = SHARED_WORDS + _words(1, 60)
DONOR_WORDS = SHARED_WORDS + _words(2, 60)


def _texts(words: list[str], seed: int, n: int = 400) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(words[int(i)] for i in torch.randint(len(words), (8,), generator=g)) + "." for _ in range(n)]


def _train(texts: list[str], vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return core


def _latent(raw: bytes, table: torch.Tensor) -> torch.Tensor:
    """A token's hidden meaning: a decaying sum of per-byte vectors (shared tokens and new ones relate)."""
    weights = torch.tensor([0.8**j for j in range(len(raw))])
    return (weights[:, None] * table[torch.tensor(list(raw))]).sum(dim=0) / weights.sum().sqrt()


def _make_model(path, texts, vocab_size, specials, bos, eos, pad, seed, table, maps):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = _train(texts, vocab_size, specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad)
    tok.save_pretrained(path)
    vocab = read_vocabulary("x", path)
    n = len(tok)
    config = LlamaConfig(vocab_size=n, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=tok.convert_tokens_to_ids(bos),
                         eos_token_id=tok.convert_tokens_to_ids(eos),
                         pad_token_id=tok.convert_tokens_to_ids(pad) if pad else None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed + 100)
    z = torch.stack([_latent(token_bytes(vocab, t, True), table) for _, t in vocab.by_id()])  # [n, LATENT]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(z @ maps[0] + 0.02 * torch.randn((n, HIDDEN), generator=g))
        model.lm_head.weight.copy_(z @ maps[1] + 0.02 * torch.randn((n, HIDDEN), generator=g))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(model dir, donor dir): vocab 300 with <s>/</s>, vocab 400 with <|pad|>/<|bos|>/<|eos|>."""
    root = tmp_path_factory.mktemp("surgeon")
    g = torch.Generator().manual_seed(7)
    table = torch.randn((256, LATENT), generator=g)
    maps = [torch.randn((LATENT, HIDDEN), generator=g) / math.sqrt(LATENT) for _ in range(4)]
    model = _make_model(root / "model", _texts(MODEL_WORDS, 1), 300, MODEL_SPECIALS, "<s>", "</s>", None, 1,
                        table, maps[:2])
    donor = _make_model(root / "donor", _texts(DONOR_WORDS, 2), 400, DONOR_SPECIALS, "<|bos|>", "<|eos|>",
                        "<|pad|>", 2, table, maps[2:])
    return model, donor


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _vocabs(pair):
    return read_vocabulary("MODEL", pair[0]), read_vocabulary("DONOR", pair[1])


@pytest.fixture(scope="module")
def transplanted(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "omp"
    result = transplant_tokenizer(*pair, out)
    return out, result


def test_shared_tokens_keep_their_rows_exactly(pair, transplanted):
    out, result = transplanted
    model_vocab, donor_vocab = _vocabs(pair)
    before, after = _tensors(pair[0]), _tensors(out)
    shared = [(d, model_vocab.ids[t]) for t, d in donor_vocab.ids.items() if t in model_vocab.ids]
    assert result.n_shared == len(shared) > 256 and result.n_rows == donor_vocab.length == 400
    new = [d for t, d in donor_vocab.ids.items() if t not in model_vocab.ids]
    assert len(new) > 50
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert after[name].shape == (400, HIDDEN) and after[name].dtype == before[name].dtype
        d, m = torch.tensor([s[0] for s in shared]), torch.tensor([s[1] for s in shared])
        assert torch.equal(after[name][d], before[name][m]), name
        assert torch.isfinite(after[name][torch.tensor(new)]).all() and after[name][torch.tensor(new)].abs().sum() > 0
    for name in before.keys() - {"model.embed_tokens.weight", "lm_head.weight"}:
        assert torch.equal(after[name], before[name]), name
    assert set(after) == set(before)


def _held_out(pair, n=48):
    """The match with `n` shared (non-special) tokens treated as missing, and their true (donor row, model row)."""
    model_vocab, donor_vocab = _vocabs(pair)
    rows = _tensors(pair[0])["model.embed_tokens.weight"].shape[0]
    match = match_tokens(model_vocab, donor_vocab, donor_vocab.length, rows)
    candidates = sorted(d for d, m in match.exact.items() if donor_vocab.by_id()[d][1] not in donor_vocab.added)
    g = torch.Generator().manual_seed(3)
    held = [candidates[int(i)] for i in torch.randperm(len(candidates), generator=g)[:n]]
    exact = {d: m for d, m in match.exact.items() if d not in held}
    return replace(match, exact=exact, new=(*held, *match.new)), [(d, match.exact[d]) for d in held]


def _is_text(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _cosine(rebuilt: torch.Tensor, truth: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(rebuilt.float(), truth.float(), dim=1).mean().item()


def test_omp_rebuilds_held_out_rows_better_than_mean(pair):
    match, held = _held_out(pair)
    model, donor = _tensors(pair[0]), _tensors(pair[1])
    d, m = torch.tensor([h[0] for h in held]), torch.tensor([h[1] for h in held])
    report = {}
    for which, name in (("embed", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        for method in ("omp", "common_interpolation", "mean"):
            for cosine in (False, True):
                opts = TransplantOptions(approximation_method=method, k=24, cosine_similarity=cosine)
                rows = build_matrix(match, which, model[name], donor[name], opts)
                report[(which, method, cosine)] = _cosine(rows[d], model[name][m])
    for key, value in report.items():
        print(f"held-out cosine {key}: {value:.4f}")
    for which in ("embed", "lm_head"):
        for cosine in (False, True):
            assert report[(which, "omp", cosine)] > report[(which, "mean", cosine)] + 0.3
            assert report[(which, "omp", cosine)] > 0.9
        assert report[(which, "common_interpolation", True)] > report[(which, "mean", True)]


def test_omp_recovers_an_exact_combination():
    """A target that is an exact combination of 3 anchors: OMP finds those anchors and their coefficients."""
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn((50, 20), generator=g)
    target = 0.5 * anchors[3] - 1.25 * anchors[17] + 2.0 * anchors[41]
    idx, coef = approx.omp(target[None], anchors, k=3)
    assert sorted(idx[0].tolist()) == [3, 17, 41]
    got = dict(zip(idx[0].tolist(), coef[0].tolist()))
    assert got[3] == pytest.approx(0.5, abs=1e-5) and got[17] == pytest.approx(-1.25, abs=1e-5)
    # computed another way: the least-squares fit on the true support
    ref = torch.linalg.lstsq(anchors[[3, 17, 41]].double().T, target.double()[:, None]).solution[:, 0]
    assert torch.allclose(torch.tensor([got[3], got[17], got[41]], dtype=torch.float64), ref, atol=1e-9)


def test_barycentric_weights_sum_to_one():
    g = torch.Generator().manual_seed(1)
    anchors, targets = torch.randn((30, 8), generator=g), torch.randn((4, 8), generator=g)
    idx, values = approx.neighbours(targets, anchors, 5, cosine=True)
    w = approx.interpolation_weights(targets, anchors, idx, values, "barycentric", True)
    assert torch.allclose(w.sum(dim=1), torch.ones(4, dtype=w.dtype), atol=1e-9)
    w = approx.interpolation_weights(targets, anchors, idx, values, "distance_proportional", True)
    assert torch.allclose(w.sum(dim=1), torch.ones(4, dtype=w.dtype), atol=1e-9) and (w >= 0).all()


def test_zero_mean_subword_and_seeded_randn(pair, tmp_path):
    model_vocab, donor_vocab = _vocabs(pair)
    new = torch.tensor([d for t, d in donor_vocab.ids.items() if t not in model_vocab.ids])
    transplant_tokenizer(*pair, tmp_path / "zero", approximation_method="zero")
    after = _tensors(tmp_path / "zero")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not after[name][new].any(), name
    match, held = _held_out(pair)
    model = _tensors(pair[0])["model.embed_tokens.weight"]
    d, m = torch.tensor([h[0] for h in held]), torch.tensor([h[1] for h in held])
    mean = build_matrix(match, "embed", model, None, TransplantOptions(approximation_method="mean"))
    assert torch.allclose(mean[d], model.float().mean(dim=0).expand(len(held), -1))
    from mergelib.tokenizer.transplant import subword_pieces

    pieces = subword_pieces(model_vocab, donor_vocab, list(match.new))
    sub = build_matrix(match, "embed", model, None, TransplantOptions(approximation_method="subword"), pieces)
    print(f"held-out cosine subword: {_cosine(sub[d], model[m]):.4f}, mean: {_cosine(mean[d], model[m]):.4f}")
    # a held-out token that is whole UTF-8 text is in MODEL's vocabulary, so MODEL's tokenizer gives it back as one
    # piece: its own row; a lone byte of a multi-byte character is no text to split and gets the mean row
    tokens = dict((i, t) for i, t in donor_vocab.by_id())
    text = [_is_text(token_bytes(donor_vocab, tokens[r], True)) for r, _ in held]
    assert any(text) and not all(text)
    for (r, own), is_text in zip(held, text):
        assert torch.equal(sub[r], model[own] if is_text else mean[r])
    runs = [build_matrix(match, "embed", model, None, TransplantOptions(approximation_method="randn", seed=s))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0][d], runs[2][d])


def test_byte_spellings_and_prefix_match(pair, tmp_path):
    model_vocab, donor_vocab = _vocabs(pair)
    assert token_bytes(donor_vocab, "Ġka", True) == b" ka" and token_bytes(donor_vocab, "Ċ", True) == b"\n"
    assert token_bytes(donor_vocab, "▁ka", False) == b" ka" and token_bytes(donor_vocab, "<0x0A>", False) == b"\n"
    transplant_tokenizer(*pair, tmp_path / "pm", approximation_method="zero", prefix_match="embed")
    after, before = _tensors(tmp_path / "pm"), _tensors(pair[0])
    match = match_tokens(model_vocab, donor_vocab, 400, before["model.embed_tokens.weight"].shape[0])
    assert match.by_prefix
    for d, m in match.by_prefix.items():  # embed copies the longest prefix's row; lm_head stays approximated (zero)
        assert torch.equal(after["model.embed_tokens.weight"][d], before["model.embed_tokens.weight"][m])
        assert not after["lm_head.weight"][d].any()


def test_output_loads_with_the_donors_tokenizer(pair, transplanted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = transplanted
    model_tok, donor_tok = AutoTokenizer.from_pretrained(pair[0]), AutoTokenizer.from_pretrained(pair[1])
    out_tok = AutoTokenizer.from_pretrained(out)
    texts = [" ".join(SHARED_WORDS[i : i + 6]) for i in range(0, 48, 6)]
    for text in texts:
        assert out_tok(text).input_ids == donor_tok(text).input_ids
    new_model = AutoModelForCausalLM.from_pretrained(out).eval()
    old_model = AutoModelForCausalLM.from_pretrained(pair[0]).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == new_model.config.vocab_size == len(donor_tok) == 400
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        donor_tok.bos_token_id, donor_tok.eos_token_id, donor_tok.pad_token_id) == (1, 2, 0)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2
    agree = 0
    with torch.no_grad():
        for text in texts:
            old_next = old_model(torch.tensor([model_tok(text).input_ids])).logits[0, -1]
            new_next = new_model(torch.tensor([donor_tok(text).input_ids])).logits[0, -1]
            assert torch.isfinite(old_next).all() and torch.isfinite(new_next).all()
            a = model_tok.decode([int(old_next.argmax())])
            b = donor_tok.decode([int(new_next.argmax())])
            agree += bool(a and b and (a.startswith(b) or b.startswith(a)))
    rate = agree / len(texts)
    print(f"next-token agreement (transplanted vs original, text tokenised each way): {rate:.2f} over {len(texts)}")
    assert math.isfinite(rate)


def test_rerun_replaces_a_mergelib_output_and_refuses_others(pair, tmp_path):
    out = tmp_path / "out"
    transplant_tokenizer(*pair, out, approximation_method="mean")
    first = (out / "model.safetensors").read_bytes()
    transplant_tokenizer(*pair, out, approximation_method="mean")
    assert (out / "model.safetensors").read_bytes() == first  # same inputs, same bytes
    assert not list(tmp_path.glob(".out.*"))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by mergelib"):
        transplant_tokenizer(*pair, stranger)
    assert [p.name for p in stranger.iterdir()] == ["keep.txt"]


def test_bad_input_is_one_line_and_writes_nothing(pair, tmp_path, capsys):
    no_embed = tmp_path / "gpt"
    no_embed.mkdir()
    save_file({"transformer.wte.weight": torch.zeros(4, 2)}, str(no_embed / "model.safetensors"))
    (no_embed / "config.json").write_text("{}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_embed / name).write_bytes((pair[0] / name).read_bytes())
    out = tmp_path / "nested" / "out"
    cases = [
        ([str(tmp_path / "missing"), str(pair[1]), str(out)], ("MODEL", "missing")),
        ([str(pair[0]), str(tmp_path / "missing"), str(out)], ("DONOR", "missing")),
        ([str(no_embed), str(pair[1]), str(out)], ("MODEL", "embed_tokens")),
        ([str(pair[0]), str(pair[1]), str(out), "-k", "0"], ("-k", "at least 1")),
        ([str(pair[0]), str(pair[1]), str(out), "-a", "magic"], ("--approximation-method", "magic")),
        ([str(pair[0]), str(pair[1]), str(out), "--batch-size", "0"], ("--batch-size",)),
    ]
    for argv, fragments in cases:
        try:
            code = main(["tokensurgeon", *argv])
        except SystemExit as exc:  # argparse refuses an unknown choice itself
            code = exc.code
        assert code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        for fragment in fragments:
            assert fragment in err[0], (fragment, err[0])
        assert not (tmp_path / "nested").exists(), argv
    for bad, error in (({"k": 0}, RecipeError), ({"approximation_method": "magic"}, RecipeError),
                       ({"prefix_match": "maybe"}, RecipeError)):
        with pytest.raises(error):
            transplant_tokenizer(*pair, out, **bad)
    with pytest.raises(InputModelError, match="embed_tokens"):
        transplant_tokenizer(no_embed, pair[1], out)
    assert not (tmp_path / "nested").exists()


def test_cli_runs_and_exits_2_on_bad_input(pair, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "mergelib", "tokensurgeon", *args], capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    proc = run(str(pair[0]), str(pair[1]), str(tmp_path / "out"), "-k", "8", "-c", "-a", "common_interpolation",
               "-w", "barycentric")
    assert proc.returncode == 0, proc.stderr
    assert "400 rows" in proc.stdout and (tmp_path / "out" / "tokenizer.json").is_file()
    proc = run(str(pair[0]), str(pair[1]), str(tmp_path / "bad"), "-k", "0")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "-k" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_choices_match_the_library():
    from mergelib import cli
    from mergelib.tokenizer.transplant import MATCH_SCOPES

    assert cli.TOKENSURGEON_METHODS == approx.METHODS
    assert cli.TOKENSURGEON_WEIGHT_SCHEMES == approx.WEIGHT_SCHEMES
    assert cli.TOKENSURGEON_SUBWORD_METHODS == approx.SUBWORD_METHODS
    assert cli.TOKENSURGEON_MATCH_SCOPES == MATCH_SCOPES


def test_recipe_transplant_choices_match_the_library():
    from typing import get_args

    from mergelib.config.recipe import TransplantConfig
    from mergelib.tokenizer.transplant import MATCH_SCOPES

    fields = TransplantConfig.model_fields
    assert get_args(fields["approximation_method"].annotation) == approx.METHODS
    assert get_args(fields["weight_scheme"].annotation) == approx.WEIGHT_SCHEMES
    assert get_args(fields["subword_method"].annotation) == approx.SUBWORD_METHODS
    assert get_args(fields["prefix_match"].annotation) == get_args(fields["byte_match"].annotation) == MATCH_SCOPES
    defaults = TransplantOptions()
    assert all(getattr(defaults, k) == f.default for k, f in fields.items())


def test_recipe_merges_models_with_different_vocabularies_through_a_transplant(pair, tmp_path):
    """`tokenizer: {source: DONOR, transplant: omp}`: MODEL gets DONOR's tokenizer (exactly what `tokensurgeon`
    writes), DONOR is used as it is, and the merge of the two equals a linear merge of the transplanted copy and
    DONOR; a second merge reuses the cached transplant."""
    from mergelib.merging.api import merge

    model, donor = pair
    recipe = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 0.5}},
                                                   {"model": str(donor), "parameters": {"weight": 0.5}}],
              "tokenizer": {"source": str(donor), "transplant": "omp"}, "dtype": "float32"}
    merge(recipe, tmp_path / "out")
    by_hand = transplant_tokenizer(model, donor, tmp_path / "by_hand").out_dir
    expected = {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": str(by_hand), "parameters": {"weight": 0.5}},
                           {"model": str(donor), "parameters": {"weight": 0.5}}]}
    merge(expected, tmp_path / "expected")
    got, want = _tensors(tmp_path / "out"), _tensors(tmp_path / "expected")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert got["model.embed_tokens.weight"].shape[0] == 400
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (donor / "tokenizer.json").read_text()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "given the tokenizer of" in card and "shared tokens keep their rows" in card

    cached = list((Path(os.environ["MERGELIB_CACHE"]) / "transplant").iterdir())
    stamp = {p: (p / "model.safetensors").stat().st_mtime_ns for p in cached}
    merge(recipe, tmp_path / "again")
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in cached} == stamp  # reused, not rebuilt
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_recipe_transplant_errors_name_the_field(pair, tmp_path):
    from mergelib.config.recipe import load_recipe

    model, donor = pair
    base = {"merge_method": "linear", "models": [str(model), str(donor)]}
    with pytest.raises(RecipeError, match="source.*union"):
        load_recipe({**base, "tokenizer": {"transplant": "omp"}})
    with pytest.raises(RecipeError, match="approximation_method"):
        load_recipe({**base, "tokenizer": {"source": str(donor), "transplant": "nearest"}})
    with pytest.raises(RecipeError, match="k"):
        load_recipe({**base, "tokenizer": {"source": str(donor), "transplant": {"k": 0}}})
