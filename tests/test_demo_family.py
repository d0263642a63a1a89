"""The demo family: data formats and held-out isolation, tokenizer, schedule, determinism, and (slow) its quality bar."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mergelib.families.demo import (
    BOS,
    EOS,
    IGNORE,
    PAD,
    accuracy,
    batch_tensors,
    build_demo_family,
    decode,
    encode,
    greedy_answers,
    lr_at,
    make_config,
    read_family,
    skill_accuracy,
    torch_threads,
)
from mergelib.families.demo_data import (
    SKILLS,
    Streams,
    heldout,
    heldout_keys,
    validation,
    write_eval_data,
    write_validation_data,
)
from mergelib.pipeline.evaluate import DATA_DIR


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # the 2 cores are shared: more threads than free cores is many times slower
        yield


@pytest.fixture(scope="module")
def quick_family(tmp_path_factory):
    return build_demo_family(tmp_path_factory.mktemp("demo") / "fam", seed=0, quick=True)


def _solve_by_parsing(prompt: str) -> str:
    """The answer to a target-format prompt, worked out from the text alone (independent of demo_data)."""
    body, marker = prompt[:-1], prompt[-1]
    if marker == "=":
        a, b = body.split("+")
        return str(int(a) + int(b))
    return body[::-1] if marker == ">" else "".join(sorted(body))


def test_heldout_golden_and_answers():
    assert heldout("add", 2) == [("41+54=", "95"), ("52+55=", "107")]  # fixed seed: these never change
    assert heldout("rev", 1) == [("hku>", "ukh")]
    assert heldout("sort", 1) == [("omabry:", "abmory")]
    for name in SKILLS:
        rows = heldout(name)
        assert len(rows) == len({p for p, _ in rows}) == 200
        assert all(answer == _solve_by_parsing(prompt) for prompt, answer in rows)


def test_latent_and_noisy_formats():
    add, rev, sort = SKILLS["add"], SKILLS["rev"], SKILLS["sort"]
    assert add.latent("23 45") == ("23 45 ", "68") and add.target("23 45") == ("23+45=", "68")
    assert rev.latent("abcd") == ("abcd ", "dcba") and sort.latent("dbca") == ("dbca  ", "abcd")
    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = add.noisy("23 45", rng)
        assert prompt == "23+45=" and 20 <= int(answer) <= 198
        prompt, answer = rev.noisy("abcd", rng)
        assert prompt == "abcd>" and len(answer) == 4 and answer.isalpha()


def test_training_streams_never_show_heldout_problems():
    streams = Streams()
    banned = set()
    for name, s in SKILLS.items():
        for key in heldout_keys(name):
            banned |= {s.target(key)[0], s.latent(key)[0]}  # noisy prompts are target prompts
    base = streams.base("t/base")
    seen = [next(base) for _ in range(6000)]
    for name in SKILLS:
        ft = streams.finetune(name, f"t/{name}", replay=0.3)
        seen += [next(ft) for _ in range(3000)]
    assert not banned & {p for p, _ in seen}


def test_base_mixture_fractions_and_replay():
    base = Streams().base("t/mix")
    prompts = [next(base)[0] for _ in range(20000)]
    copies = sum(p.endswith("|") for p in prompts) / len(prompts)
    latent = sum(p.endswith(" ") for p in prompts) / len(prompts)
    assert abs(copies - 0.4) < 0.02 and abs(latent - 0.3) < 0.02
    ft = Streams().finetune("rev", "t/ft", replay=0.3)
    rows = [next(ft) for _ in range(20000)]
    own = sum(p.endswith(">") for p, _ in rows) / len(rows)
    assert abs(own - 0.7) < 0.02  # replay never draws the fine-tune's own skill, in any format
    assert all(a == p[:-1][::-1] for p, a in rows if p.endswith(">"))
    assert not any(p.endswith(" ") and not p.endswith("  ") and p[:-1].isalpha() for p, _ in rows)


def test_shipped_eval_data_is_what_the_generator_writes(tmp_path):
    written = write_eval_data(tmp_path)
    assert sorted(written) == ["add", "ppl", "rev", "sort"]
    for path in written.values():
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes()
    texts = [json.loads(line)["text"] for line in (tmp_path / "ppl.jsonl").read_text().splitlines()]
    assert texts[0] == "41+54=95" and len(texts) == 600


def test_shipped_validation_data_is_disjoint_from_the_held_out_prompts(tmp_path):
    written = write_validation_data(tmp_path)
    for path in written.values():
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes()
    for name in SKILLS:
        prompts = [p for p, _ in validation(name)]
        assert len(set(prompts)) == len(prompts) == 200
        assert not set(prompts) & {p for p, _ in heldout(name)}
    assert all(str(eval(p[:-1])) == a for p, a in validation("add"))  # noqa: S307 (digits and '+')
    assert all(p[:-1][::-1] == a for p, a in validation("rev"))


def test_batch_tensors_mask_prompt_and_padding():
    ids, labels = batch_tensors([("ab|", "ab"), ("1+2=", "3")])
    a, b, bar, one, plus, two, eq, three = (encode(c)[0] for c in "ab|1+2=3")
    assert ids.tolist() == [[BOS, a, b, bar, a, b, EOS], [BOS, one, plus, two, eq, three, EOS]]
    assert labels.tolist() == [[IGNORE] * 4 + [a, b, EOS], [IGNORE] * 5 + [three, EOS]]
    ids, labels = batch_tensors([("ab|", "ab"), ("a|", "a")])
    assert ids[1].tolist() == [BOS, a, bar, a, EOS, PAD, PAD] and labels[1].tolist()[-2:] == [IGNORE, IGNORE]


def test_lr_schedule_golden():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)  # halfway through the cosine: 0.1 + 0.9 * 0.5
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_config_parameter_count():
    from transformers import LlamaForCausalLM

    v, h, i, n = make_config().vocab_size, 128, 256, 2
    by_hand = 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h  # embed + lm_head, layers, final norm
    assert sum(p.numel() for p in LlamaForCausalLM(make_config()).parameters()) == by_hand


def test_layout_tokenizer_and_record(quick_family):
    from transformers import AutoConfig, AutoTokenizer

    root = quick_family.root
    assert [p.name for p in quick_family.finetunes] == ["ft_add", "ft_rev", "ft_sort"]
    record = read_family(root)
    assert record.finetunes == {"add": "ft_add", "rev": "ft_rev", "sort": "ft_sort"} and record.quick
    assert all((root / rel).is_file() for rel in record.data.values())
    from importlib.metadata import version

    assert record.libraries["transformers"] == version("transformers")  # what trained it, recorded
    assert set(record.libraries) == {"torch", "transformers", "tokenizers", "numpy", "safetensors"}
    for model in (quick_family.base, *quick_family.finetunes):
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
            p.name for p in model.iterdir()
        }
        assert AutoConfig.from_pretrained(model).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(quick_family.base)
    for text in ("23+45=68", "abc def\n", "x|y>z:"):
        assert tok(text).input_ids == [BOS, *encode(text)]
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)


def test_same_seed_same_bytes_other_seed_other_weights(quick_family, tmp_path):
    again = build_demo_family(tmp_path / "again", seed=0, quick=True)
    files = sorted(p.relative_to(quick_family.root) for p in quick_family.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for rel in files:
        assert (quick_family.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    stale = tmp_path / "other" / "ft_sort"  # left by an earlier build with more skills
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    other = build_demo_family(tmp_path / "other", seed=1, quick=True, skills=("rev",))
    assert [p.name for p in other.finetunes] == ["ft_rev"] and not stale.exists()
    assert read_family(other.root).finetunes == {"rev": "ft_rev"}
    assert (other.base / "model.safetensors").read_bytes() != (quick_family.base / "model.safetensors").read_bytes()


def test_greedy_answers_match_transformers_generate(quick_family):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(quick_family.finetunes[0], dtype=torch.float32)
    prompts = [p for p, _ in heldout("add", 2)] + ["ab|", "abc>"]
    ours = greedy_answers(model, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([[BOS, *encode(prompt)]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=EOS, pad_token_id=PAD)[0, ids.shape[1]:].tolist()
        expected = decode(out[: out.index(EOS)]) if EOS in out else None
        assert got == expected
    rows = heldout("rev", 10)
    assert accuracy(model, rows) == sum(a == w for a, (_, w) in zip(greedy_answers(model, [p for p, _ in rows]),
                                                                      rows)) / 10


@pytest.mark.slow
def test_full_family_meets_the_quality_bar(tmp_path):
    family = build_demo_family(tmp_path / "full", seed=0)
    base = skill_accuracy(family.base)
    assert all(score < 0.2 for score in base.values()), base
    for skill, model in zip(SKILLS, family.finetunes):
        own = skill_accuracy(model, (skill,))[skill]
        assert own >= 0.9, (model.name, own)


TRAIN_A_FEW_STEPS = """
from mergelib.families.demo import Streams, SKILLS, new_model, train
train(new_model(0), Streams(tuple(SKILLS)).base("demo/0/base"), steps=3, lr=1e-3, batch_size=2, warmup=1,
      desc="demo family: base")
"""


def test_training_shows_progress_in_a_terminal_and_stays_quiet_when_piped():
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_A_FEW_STEPS], stdin=follower, stdout=follower,
                            stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    assert b"demo family: base" in seen and b"/3 [" in seen, seen[-500:]
    piped = subprocess.run([sys.executable, "-c", TRAIN_A_FEW_STEPS], capture_output=True, timeout=300)
    assert piped.returncode == 0 and piped.stderr == b"" and piped.stdout == b""
