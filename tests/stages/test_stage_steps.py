"""The steps after the merge: tokenizer check (added tokens against the base, the engine's report copied), the export
stage's wrapper (export=none, a failed check still writes the DVC metric; a passing export runs in
test_dvc_pipeline.py), and publishing: dry run, a loopback Hub, the MLflow registry."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

import mergelib
from mergelib.config.compose import compose
from mergelib.config.run import run_config
from mergelib.errors import InputModelError
from mergelib.export import ExportCheckError
from mergelib.pipeline.export_step import export_model
from mergelib.pipeline.publish_step import publish_merge
from mergelib.pipeline.tokenizer_step import collect_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # mlflow


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def merged(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("steps") / "merged"
    mergelib.merge({"merge_method": "task_arithmetic", "base_model": str(tiny_family.base),
                    "models": [{"model": str(p), "parameters": {"weight": 0.8}} for p in tiny_family.finetunes]},
                   out, quiet=True)
    return out


def test_collect_tokenizer_copies_checked_files_and_notes_the_copy(tiny_family, tmp_path):
    out = tmp_path / "tok"
    report = collect_tokenizer(tiny_family.base, out, tiny_family.base, tmp_path / "reports/tokenizer_report.md")
    assert report["tokens"] == report["model_vocab_size"] == 260  # 4 specials + 256 bytes
    assert report["added_tokens"] == {} and report["padding_rows"] == 0
    assert report["source"] == "copied from the base model"
    assert set(report["files"]) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    for name, digest in report["files"].items():
        assert sha(out / name) == sha(tiny_family.base / name) == digest
    assert json.loads((out / "tokenizer_report.json").read_text()) == report
    note = (tmp_path / "reports/tokenizer_report.md").read_text()
    assert "260 tokens, config vocab_size 260 (0 padding rows)" in note and "beyond the base's vocabulary: 0." in note


def test_added_tokens_are_recorded_and_the_engine_report_copied(tiny_family, tmp_path):
    from transformers import AutoTokenizer

    model = shutil.copytree(tiny_family.base, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["<tool>", "<think>"])
    tok.save_pretrained(model)
    with pytest.raises(InputModelError, match="262 tokens but the model embeds 260"):
        collect_tokenizer(model, tmp_path / "tok", tiny_family.base)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 264}))
    (model / "tokenizer_report.md").write_text("# engine report\n")
    report = collect_tokenizer(model, tmp_path / "tok", tiny_family.base, tmp_path / "r.md")
    assert report["added_tokens"] == {"<tool>": 260, "<think>": 261} and report["padding_rows"] == 2
    assert report["source"] == "assembled by the merge engine"
    assert (tmp_path / "r.md").read_text() == "# engine report\n"


def test_collect_tokenizer_without_files_names_the_fix(tiny_family, tmp_path):
    model = shutil.copytree(tiny_family.base, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    with pytest.raises(InputModelError, match="no tokenizer files"):
        collect_tokenizer(model, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_export_none_and_a_failed_check_still_writes_the_metric(merged, tmp_path, monkeypatch):
    none = run_config(compose(["export=none"])).export
    assert export_model(merged, merged, tmp_path / "ex", none, tmp_path / "export.json", "m") == {}
    assert json.loads((tmp_path / "export.json").read_text()) == {"export": {}}

    import mergelib.export as export_pkg

    def failing(model_dir, out_dir, **kwargs):
        out_dir.mkdir(parents=True)
        (out_dir / "metrics.json").write_text(json.dumps({"safetensors-float16": {"passed": False, "top1": 0.5}}))
        raise ExportCheckError("export check failed: safetensors-float16 top1 0.5 < 1.0")

    monkeypatch.setattr(export_pkg, "export_all", failing)
    spec = run_config(compose(["export=safetensors"])).export
    with pytest.raises(ExportCheckError, match="top1 0.5"):
        export_model(merged, merged, tmp_path / "ex2", spec, tmp_path / "export.json", "m")
    assert json.loads((tmp_path / "export.json").read_text()) == {
        "export": {"safetensors-float16": {"passed": False, "top1": 0.5}}}


def test_publish_none_lists_what_would_be_uploaded(merged, tmp_path):
    export = tmp_path / "export"
    (export / "safetensors-float16").mkdir(parents=True)
    (export / "safetensors-float16" / "model.safetensors").write_bytes(b"x" * 10)
    (export / "metrics.json").write_text(json.dumps({"safetensors-float16": {"passed": True, "top1": 1.0}}))
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "metrics.json").write_text(json.dumps({"merged": {"demo_add": {"exact_match": 0.75}}}))
    config = run_config(compose(["publish=none"])).publish
    manifest = publish_merge(config, merged, export, reports, tmp_path / "pub")
    assert manifest["target"] == "none" and manifest["tag"] == "v0.1.0" and manifest["repo_id"] == "you/merged-model"
    expected = {p.name: {"bytes": p.stat().st_size, "sha256": sha(p)} for p in merged.iterdir() if p.name != "README.md"}
    expected["safetensors-float16/model.safetensors"] = {"bytes": 10, "sha256": hashlib.sha256(b"x" * 10).hexdigest()}
    card = (tmp_path / "pub" / "README.md").read_text()
    expected["README.md"] = {"bytes": len(card.encode()), "sha256": hashlib.sha256(card.encode()).hexdigest()}
    assert manifest["files"] == expected  # the export's own reports are not uploaded
    assert "| demo_add/exact_match | 0.75" in card.replace("0.750", "0.75") and "safetensors-float16" in card
    assert json.loads((tmp_path / "pub" / "manifest.json").read_text()) == manifest


def test_publish_hub_uploads_tags_and_refuses_the_same_tag(merged, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from huggingface_hub import constants

    from mergelib.publish import PublishError

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fakehub import FakeHub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_TOKEN", "hf_fake")  # the token comes from the environment, as for users
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the fake Hub is on loopback; nothing leaves
    hub = FakeHub(tokens=("hf_fake",)).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        config = run_config(compose(["publish=hub", "publish.repo_id=me/merged", "publish.version=1.2.0"])).publish
        manifest = publish_merge(config, merged, tmp_path / "no-export", tmp_path / "no-reports", tmp_path / "pub")
        repo = hub.repos["me/merged"]
        assert manifest["tag"] == "v1.2.0" and repo.tags["v1.2.0"] == manifest["commit"]
        files = repo.commits[manifest["commit"]].files
        assert set(files) >= set(manifest["files"]) and b"task_arithmetic" in files["README.md"]
        assert files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
        with pytest.raises(PublishError, match="tag 'v1.2.0' already exists"):
            publish_merge(config, merged, tmp_path / "no-export", tmp_path / "no-reports", tmp_path / "pub2")
        assert not (tmp_path / "pub2").exists()
    finally:
        hub.stop()


def test_publish_mlflow_registers_a_version_of_the_run(merged, tmp_path):
    from mlflow.tracking import MlflowClient

    from mergelib.publish import PublishError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    config = run_config(compose(["publish=mlflow", "publish.model_name=demo-merge"])).publish
    with pytest.raises(PublishError, match="tracking is off"):
        publish_merge(config, merged, tmp_path / "x", tmp_path / "x", tmp_path / "pub")
    manifest = publish_merge(config, merged, tmp_path / "x", tmp_path / "x", tmp_path / "pub", run_id=run_id,
                             tracking_uri=uri)
    assert manifest["model_version"] == "1" and manifest["aliases"] == ["v0-1-0"]
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = registry.get_model_version_by_alias("demo-merge", "v0-1-0")
    assert version.run_id == run_id and version.tags["mergelib.tag"] == "v0.1.0"
    logged = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/mergelib_run.json"} <= logged
