"""Tokenizer assembly: output vocabularies, embedding row alignment, saved tokenizers, chat templates.

Rows are checked against a reference written from the rules in mergekit-semantics.md ("Embedding fill") that
reads vocabularies with the tokenizers library and rows straight from the safetensors files, plus golden
literals derived by hand from the fixture (mergelib.families.vocab.make_vocab_trio).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

from mergelib.config.recipe import TokenizerConfig
from mergelib.errors import InputModelError, RecipeError
from mergelib.families.vocab import TRIO_TEMPLATE, make_vocab_trio
from mergelib.tokenizer import BUILTIN_TEMPLATES, RowSource, align_rows, plan_tokenizer
from mergelib.tokenizer.rows import plan_rows

ROWS = {"a": 266, "b": 264, "c": 261}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    return make_vocab_trio(tmp_path_factory.mktemp("trio"))


def labels(trio) -> dict[str, str]:
    return {k: str(p) for k, p in trio.items()}


def plan_for(trio, source="union", *, base=None, pad=None, tokens=None, template=None, legacy=False, order="abc"):
    lab = labels(trio)
    config = None if legacy else TokenizerConfig.model_validate(
        {"source": lab.get(source, source), "pad_to_multiple_of": pad, "tokens": _tokens(tokens, lab)})
    return plan_tokenizer({lab[k]: trio[k] for k in order}, lab[base] if base else None, config,
                          lab.get(source, source) if legacy else None, template, {lab[k]: ROWS[k] for k in order})


def _tokens(tokens, lab):
    if tokens is None:
        return None
    text = json.dumps(tokens)
    for k, label in lab.items():
        text = text.replace(f'"@{k}"', json.dumps(label))  # "@b" in a tokens block names model b
    return json.loads(text)


def matrices(trio, name) -> dict[str, torch.Tensor]:
    out = {}
    for k, path in trio.items():
        with safe_open(path / "model.safetensors", framework="pt") as f:
            out[str(path)] = f.get_tensor(name)
    return out


def reference_matrix(trio, plan, model, name, *, base="a", owner="a", explicit=None, force=()) -> torch.Tensor:
    """The aligned matrix of `model`, row by row from the written rules (float64 sums for means)."""
    lab = labels(trio)
    mats = {k: matrices(trio, name)[lab[k]] for k in trio}
    vocab = {k: Tokenizer.from_file(str(trio[k] / "tokenizer.json")).get_vocab(with_added_tokens=True) for k in trio}
    length = {k: max(v.values()) + 1 for k, v in vocab.items()}
    explicit = explicit or {}

    def mean(rows_of):
        total = torch.zeros(mats["a"].shape[1], dtype=torch.float64)
        for k, i in rows_of:
            total += mats[k][i].double()
        return (total / len(rows_of)).float()

    out = []
    for r in range(plan.vocab_size):
        token = plan.tokens[r] if r < len(plan.tokens) else None
        if token is None:
            if r < ROWS[owner]:
                out.append(mats[model][r] if model == owner or r < ROWS[model] else mats[owner][r])
            else:
                n = min(length[model], ROWS[model])
                out.append(mean([(model, i) for i in range(n)]))
            continue
        has = {k: vocab[k][token] for k in "abc" if token in vocab[k] and vocab[k][token] < ROWS[k]}
        if model in has and token not in force:
            out.append(mats[model][has[model]])
        elif token in explicit:
            src = explicit[token]
            out.append(torch.zeros(mats["a"].shape[1]) if src == "zero" else mats[src[0]][src[1]])
        elif not has:
            out.append(torch.zeros(mats["a"].shape[1]))
        elif len(has) == 1:
            (k, i), = has.items()
            out.append(mats[k][i])
        elif base in has:
            out.append(mats[base][has[base]])
        else:
            out.append(mean(list(has.items())))
    return torch.stack(out)  # [vocab_size, hidden]


CASES = {
    "union-pad8": dict(kw=dict(source="union", pad=8), owner="a", base="a"),
    "union-base-c": dict(kw=dict(source="union", base="c"), owner="c", base="c"),
    "base": dict(kw=dict(source="base"), owner="a", base="a"),
    "model-b-pad16": dict(kw=dict(source="b", pad=16), owner="b", base="a"),
    "union-tokens": dict(
        kw=dict(source="union", tokens={
            "<tool>": {"source": {"kind": "zero"}, "force": True},
            "<|im_start|>": {"source": {"kind": "model_token", "model": "@b", "token": "<|im_end|>"}},
            "<|im_end|>": {"source": "@b", "force": True},
            "<new>": {},
            "lo": {"source": {"kind": "model_token", "model": "@a", "token_id": 108}},
        }),
        owner="a", base="a", force=("<tool>", "<|im_end|>"),
        explicit={"<tool>": "zero", "<|im_start|>": ("b", 262), "<|im_end|>": ("b", 262), "lo": ("a", 108)},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", [EMBED, HEAD])
def test_aligned_rows_follow_the_rules(trio, case, name):
    spec = CASES[case]
    plan = plan_for(trio, **spec["kw"])
    inputs = matrices(trio, name)
    for k, label in labels(trio).items():
        got = align_rows(plan, label, inputs)
        want = reference_matrix(trio, plan, k, name, base=spec["base"], owner=spec["owner"],
                                explicit=spec.get("explicit"), force=spec.get("force", ()))
        assert got.shape == want.shape == (plan.vocab_size, inputs[label].shape[1])
        assert got.dtype == inputs[label].dtype
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_union_vocabulary_golden(trio):
    plan = plan_for(trio, "union", pad=8)
    assert plan.tokens[258:] == ("ł", "Ń", "<|im_start|>", "<|im_end|>", "lo", "Ġlo", "<tool>")
    assert plan.vocab_size == 272  # 265 tokens, a's 266 rows kept, padded to a multiple of 8
    assert [(n.token, n.id, n.origin, n.added) for n in plan.added] == [
        ("lo", 262, str(trio["b"]), False), ("Ġlo", 263, str(trio["b"]), False), ("<tool>", 264, str(trio["b"]), True)]
    assert plan_for(trio, "union").vocab_size == 266
    lab = labels(trio)
    a, b, c = (plan.row_sources[lab[k]] for k in "abc")
    assert a[261] == RowSource("own", lab["a"], 261)
    assert a[262] == RowSource("model", lab["b"], 260)
    assert a[264] == RowSource("average", parts=((lab["b"], 263), (lab["c"], 260)))
    assert a[265] == RowSource("own", lab["a"], 265)  # a's padded row past the tokenizer is kept
    assert b[261] == RowSource("own", lab["b"], 262)  # <|im_end|> is id 262 in b
    assert b[265] == RowSource("model", lab["a"], 265)  # past b's 264 rows: the vocabulary owner's row
    assert c[261] == RowSource("model", lab["a"], 261)  # in a and b: the base's row
    assert c[264] == RowSource("own", lab["c"], 260)
    assert {a[r] for r in range(266, 272)} == {RowSource("mean", lab["a"], 262)}
    assert {c[r] for r in range(266, 272)} == {RowSource("mean", lab["c"], 261)}  # <c_only> has no row in c


def test_union_with_base_c_keeps_c_ids_and_its_rowless_token(trio):
    plan = plan_for(trio, "union", base="c")
    assert plan.tokens[260:] == ("<tool>", "<c_only>", "<|im_start|>", "<|im_end|>", "lo", "Ġlo")
    assert plan.vocab_size == 266
    lab = labels(trio)
    assert {plan.row_sources[lab[k]][261] for k in "abc"} == {RowSource("zero")}  # no model has a row for it
    assert plan.row_sources[lab["a"]][260] == RowSource("model", lab["c"], 260)  # base c has <tool>


def test_base_and_model_sources_keep_that_vocabulary(trio):
    base = plan_for(trio, "base")
    assert base.files["tokenizer.json"] == (trio["a"] / "tokenizer.json").read_text()  # nothing appended
    assert base.vocab_size == 266 and len(base.tokens) == 262 and base.added == ()
    model_b = plan_for(trio, "b", pad=16)
    assert model_b.owner == str(trio["b"]) and model_b.vocab_size == 272
    assert model_b.tokens[260:] == ("lo", "Ġlo", "<|im_end|>", "<tool>")
    legacy = plan_for(trio, "b", pad=None, legacy=True)
    assert legacy.row_sources == plan_for(trio, "b").row_sources
    assert plan_for(trio, "union", legacy=True).row_sources == plan_for(trio, "union").row_sources


def test_tokens_block_appends_and_overrides(trio):
    plan = plan_for(trio, **CASES["union-tokens"]["kw"])
    lab = labels(trio)
    assert plan.tokens[265] == "<new>" and plan.added[-1].origin is None
    assert {plan.row_sources[lab[k]][265] for k in "abc"} == {RowSource("zero")}
    assert plan.row_sources[lab["a"]][261] == RowSource("model", lab["b"], 262)  # forced, a has it too
    assert plan.row_sources[lab["b"]][261] == RowSource("own", lab["b"], 262)
    assert plan.row_sources[lab["b"]][262] == RowSource("own", lab["b"], 260)  # 'lo' not forced: b's own


def test_saved_union_tokenizer_encodes_planned_ids(trio, tmp_path):
    plan = plan_for(trio, "union", pad=8, template="chatml")
    plan.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 265 <= plan.vocab_size
    for i, token in enumerate(plan.tokens):
        assert tok.convert_tokens_to_ids(token) == i, token
    for token in ("<|im_start|>", "<|im_end|>", "<tool>"):
        assert tok.encode(token, add_special_tokens=False) == [plan.tokens.index(token)]
    assert tok.encode(" lo", add_special_tokens=False) == [263]  # b's BPE entry, reachable through b's merges
    assert tok.encode("hello", add_special_tokens=False)[-1] == 262
    for text in ("Hi <tool> there lo<|im_end|>", "naïve café, 東京 🙂", " lo lo\n\tlo"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    added = {t["content"] for t in json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]}
    assert added == {"<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<tool>"}  # BPE entries stay out
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    assert ids.count(260) == 2 and ids.count(261) == 1


def test_same_inputs_same_files(trio):
    one, two = plan_for(trio, "union", pad=8), plan_for(trio, "union", pad=8)
    assert one.files == two.files and one.report == two.report


def test_report_says_what_was_done(trio):
    report = plan_for(trio, "union", pad=8, template="llama3").report
    assert "3 tokens appended" in report and "'<tool>' -> id 264" in report
    assert "rows 266..271 pad to a multiple of 8 (mean embedding)" in report
    assert "2 BPE merges" in report
    assert "<|eot_id|>" in report  # llama3's markers are not tokens of this vocabulary


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
RENDERED = {  # written by hand from each format's description; the tiny bos/eos are <s> and </s>
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\nBye\n\n"
              "### Response:\n",
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_builtin_chat_templates_render(trio, tmp_path, name):
    assert set(RENDERED) == set(BUILTIN_TEMPLATES)
    plan_for(trio, "base", template=name).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == BUILTIN_TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == RENDERED[name]


def test_chat_template_auto_literal_and_kept(trio, tmp_path):
    auto = plan_for(trio, "base", template="auto")
    assert auto.chat_template == TRIO_TEMPLATE  # b and c share it, a differs
    assert "'{}'".format(trio["b"]) in auto.report
    literal = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    plan_for(trio, "base", template=literal).save(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template(CONVERSATION[1:3], tokenize=False) == "Hi|Hello!|"
    kept = plan_for(trio, "base")
    assert kept.chat_template == (trio["a"] / "chat_template.jinja").read_text()
    assert json.loads(kept.files["tokenizer_config.json"])["chat_template"] == kept.chat_template


@pytest.mark.parametrize("value, match", [
    ("chatlm", "chat_template: 'chatlm' is neither.*did you mean 'chatml'"),
    ("short {x}", "at least 20 characters"),
    ("a long string without any braces", "neither"),
    ("{% for m in messages %}{{ m }}", "not a valid Jinja template"),
])
def test_bad_chat_template(trio, value, match):
    with pytest.raises(RecipeError, match=match):
        plan_for(trio, "base", template=value)


def test_errors_name_the_model_and_the_fix(trio, tmp_path):
    slow = tmp_path / "slow"
    shutil.copytree(trio["c"], slow)
    (slow / "tokenizer.json").unlink()
    (slow / "tokenizer.model").write_bytes(b"\0")
    lab = labels(trio)
    with pytest.raises(InputModelError, match=f"model '{slow}': no tokenizer.json.*tokenizer.model.*fast"):
        plan_tokenizer({lab["a"]: trio["a"], str(slow): slow}, None, None, "base", None,
                       {lab["a"]: 266, str(slow): 261})
    with pytest.raises(RecipeError, match="tokenizer.source: 'nowhere' is not an input model"):
        plan_for(trio, "nowhere")
    with pytest.raises(RecipeError, match=r"tokenizer.tokens.<\|im_start\|>.source: model '.*/c' has no token"):
        plan_for(trio, "union", tokens={"<|im_start|>": {"source": "@c"}})
    with pytest.raises(RecipeError, match="token_id: 300 is past the 264 rows"):
        plan_for(trio, "union", tokens={"x": {"source": {"kind": "model_token", "model": "@b", "token_id": 300}}})
    with pytest.raises(RecipeError, match="not both"):
        plan_tokenizer({lab["a"]: trio["a"]}, None, TokenizerConfig(), "base", None, {lab["a"]: 266})


def test_align_rows_refuses_short_matrices(trio):
    plan = plan_for(trio, "union")
    inputs = matrices(trio, EMBED)
    inputs[str(trio["b"])] = inputs[str(trio["b"])][:200]
    with pytest.raises(InputModelError, match="has 200 rows"):
        align_rows(plan, str(trio["a"]), inputs)


def write_tokenizer(path: Path, core: Tokenizer) -> Path:
    path.mkdir(parents=True)
    core.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.parametrize("kind", ["WordLevel", "WordPiece", "Unigram"])
def test_other_tokenizer_models_union(tmp_path, kind):
    def build(words):
        if kind == "Unigram":
            core = Tokenizer(models.Unigram([(w, -float(i + 1)) for i, w in enumerate(words)], unk_id=0))
        elif kind == "WordPiece":
            core = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        else:
            core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return core

    a = write_tokenizer(tmp_path / "a", build(["[UNK]", "hello", "world"]))
    core_b = build(["[UNK]", "merge", "hello"])
    core_b.add_special_tokens(["<eos>"])
    b = write_tokenizer(tmp_path / "b", core_b)
    plan = plan_tokenizer({"a": a, "b": b}, None, TokenizerConfig(), None, None, {"a": 3, "b": 4})
    assert plan.tokens == ("[UNK]", "hello", "world", "merge", "<eos>")
    (tmp_path / "out").mkdir()
    plan.save(tmp_path / "out")
    out = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert out.encode("hello merge <eos> world").ids == [1, 3, 4, 2]
    assert plan.row_sources["a"][3] == RowSource("model", "b", 1)
    assert plan.row_sources["b"][1] == RowSource("own", "b", 2)


def test_union_refuses_tokenizers_that_split_differently(tmp_path):
    def build(pre):
        core = Tokenizer(models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
        core.pre_tokenizer = pre
        return core

    a = write_tokenizer(tmp_path / "a", build(pre_tokenizers.WhitespaceSplit()))
    b = write_tokenizer(tmp_path / "b", build(pre_tokenizers.Whitespace()))
    with pytest.raises(RecipeError, match="union needs tokenizers that split text the same way.*'b'.*pre_tokenizer"):
        plan_tokenizer({"a": a, "b": b}, None, TokenizerConfig(), None, None, {"a": 2, "b": 2})
    plan = plan_tokenizer({"a": a, "b": b}, None, TokenizerConfig(source="base"), None, None, {"a": 2, "b": 2})
    assert "note: 'b' tokenizes differently" in plan.report


@settings(max_examples=60, deadline=None)
@given(
    vocabs=st.lists(st.sets(st.sampled_from("abcdefgh"), max_size=6), min_size=2, max_size=3),
    extra_rows=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    pad=st.sampled_from([None, 1, 4, 8]),
)
def test_plan_rows_properties(vocabs, extra_rows, pad):
    labels_ = [f"m{i}" for i in range(len(vocabs))]
    ids = {m: {t: i for i, t in enumerate(sorted(v))} for m, v in zip(labels_, vocabs)}
    rows = {m: len(ids[m]) + extra for m, extra in zip(labels_, extra_rows)}
    tokens = list(sorted(vocabs[0]))
    for v in vocabs[1:]:
        tokens += [t for t in sorted(v) if t not in tokens]
    n_rows = max(len(tokens), rows["m0"])
    size = -(-n_rows // pad) * pad if pad else n_rows
    lookup = lambda m, t: ids[m].get(t)  # noqa: E731
    real = {m: len(ids[m]) for m in labels_}
    plan = plan_rows(tokens, size, labels_, "m0", "m0", lookup, rows, real, {})
    for m in labels_:
        assert len(plan[m]) == size
        for r, src in enumerate(plan[m]):
            if src.kind in ("own", "model"):
                assert src.row < rows[src.model]
                assert (src.kind == "own") == (src.model == m)
            if r < len(tokens) and tokens[r] in ids[m]:
                assert src == RowSource("own", m, ids[m][tokens[r]])  # a model that has a token keeps its row
            if src.kind == "mean":
                assert r >= n_rows and src == RowSource("mean", m, real[m])
    for r, token in enumerate(tokens):  # models lacking a token all get the same default row
        lacking = {plan[m][r] for m in labels_ if token not in ids[m]}
        assert len(lacking) <= 1
        holders = [m for m in labels_ if token in ids[m]]
        if len(holders) == 1 and lacking:
            assert lacking == {RowSource("model", holders[0], ids[holders[0]][token])}


def test_aligned_model_loads_and_embeds_the_planned_rows(trio, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    plan = plan_for(trio, "union", pad=8, template="chatml")
    a = str(trio["a"])
    out = tmp_path / "merged"
    shutil.copytree(trio["a"], out)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for name in (EMBED, HEAD):
        tensors[name] = align_rows(plan, a, matrices(trio, name))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "vocab_size": plan.vocab_size}))
    plan.save(out)
    assert not (out / "chat_template.jinja").exists()  # the copied template would override the planned one
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("<tool> lo<|im_end|>", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [1, 264, 263, 261]
    logits = model(ids).logits
    assert logits.shape == (1, 4, plan.vocab_size)
    b, c = matrices(trio, EMBED)[str(trio["b"])], matrices(trio, EMBED)[str(trio["c"])]
    rows = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(rows[264], (b[263] + c[260]) / 2, rtol=0, atol=1e-7)  # <tool>: b and c have it
    torch.testing.assert_close(rows[263], b[261], rtol=0, atol=0)  # 'Ġlo': only b has it


def test_recipe_tokens_block_schema():
    from mergelib.config.recipe import ModelRef, ModelTokenSource, ZeroSource, load_recipe

    def recipe(tokens):
        return load_recipe({"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": 1.0}}],
                            "tokenizer": {"source": "union", "tokens": tokens}})

    parsed = recipe({"<a>": {"source": "m@v1"}, "<b>": {"source": {"kind": "zero"}, "force": True},
                     "<c>": {"source": {"kind": "model_token", "model": "m", "token_id": 3}}, "<d>": {}}).tokenizer
    assert parsed.tokens["<a>"].source == ModelRef(path="m", revision="v1")
    assert parsed.tokens["<b>"].source == ZeroSource(kind="zero") and parsed.tokens["<b>"].force
    assert parsed.tokens["<c>"].source == ModelTokenSource(kind="model_token", model="m", token_id=3)
    assert parsed.tokens["<d>"].source is None and not parsed.tokens["<d>"].force
    for tokens, match in [
        ({"<x>": {"source": {"kind": "zeroo"}}}, r"tokenizer.tokens.<x>.source: a token source is a model"),
        ({"<x>": {"source": {"kind": "model_token", "model": "m"}}}, "exactly one of 'token' or 'token_id'"),
        ({"<x>": {"sourc": "m"}}, "unknown key 'tokenizer.tokens.<x>.sourc' \\(did you mean 'source'\\?\\)"),
    ]:
        with pytest.raises(RecipeError, match=match):
            recipe(tokens)
