"""Publishing: the Hub flow against a loopback fake Hub (tests/fakehub.py), the model card, the MLflow registry;
plus one opt-in test against the real Hub (HF_TOKEN and MERGELIB_REAL_HUB_REPO set)."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml
from fakehub import FakeHub  # tests/ is on sys.path (rootdir-relative test modules)

import mergelib
from mergelib.io.hashing import sha256_file
from mergelib.publish import (
    PublishError,
    PublishPlan,
    alias_for_tag,
    build_model_card,
    card_text,
    log_model_dir,
    plan_publish,
    publish_to_hub,
    register_model,
    tag_for,
)
from mergelib.publish.card import resolve_license

TOKEN = "hf_fake_token"


@pytest.fixture(scope="module")
def merged(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("publish") / "merged"
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in tiny_family.finetunes]}
    mergelib.merge(recipe, out, quiet=True)
    return out


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """No stored or environment token, a private HF_HOME, and huggingface_hub allowed to make requests."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the fake Hub is on loopback; nothing leaves


@pytest.fixture
def fake_hub(hub_env):
    hub = FakeHub(tokens=(TOKEN,)).start()
    yield hub
    hub.stop()


def commits_on_main(hub: FakeHub, repo_id: str) -> int:
    repo, count, sha = hub.repos[repo_id], 0, hub.repos[repo_id].branches["main"]
    while sha is not None:
        count, sha = count + 1, repo.commits[sha].parent
    return count


# ---------------------------------------------------------------- plan and dry run


def test_tag_names():
    assert tag_for(None, "1.2.0") == "v1.2.0" and tag_for(None, "v1.2.0-rc.1") == "v1.2.0-rc.1"
    assert tag_for("release-7", None) == "release-7"
    for bad, match in [((None, "1.2"), "not a semantic version"), ((None, None), "give a version"),
                       (("v1..2", None), "tag 'v1..2'"), (("my tag", None), "tag 'my tag'")]:
        with pytest.raises(PublishError, match=match):
            tag_for(*bad)


def test_dry_run_lists_the_upload_without_network(merged, tmp_path):
    exports = tmp_path / "exports"
    (exports / "safetensors-int8").mkdir(parents=True)
    (exports / "safetensors-int8" / "config.json").write_text("{}")
    (exports / "m-q8_0.gguf").write_bytes(b"GGUF")
    plan = publish_to_hub(merged, "me/merged", version="0.1.0", card="---\nlicense: mit\n---\n# hi\n",
                          exports=[exports / "m-q8_0.gguf", exports / "safetensors-int8"],
                          endpoint="http://127.0.0.1:9", dry_run=True)  # port 9 is closed: any request would fail
    assert isinstance(plan, PublishPlan) and plan.tag == "v0.1.0"
    paths = [f.path_in_repo for f in plan.files]
    assert "m-q8_0.gguf" in paths and "safetensors-int8/config.json" in paths and "mergelib_run.json" in paths
    assert len(paths) == len(set(paths)) == len([p for p in merged.iterdir() if p.is_file()]) + 2
    readme = next(f for f in plan.files if f.path_in_repo == "README.md")
    assert readme.content.startswith(b"---\nlicense: mit")
    text = plan.describe()
    assert text.splitlines()[0].startswith(f"would upload {len(paths)} files") and "m-q8_0.gguf" in text
    with pytest.raises(PublishError, match="two files would land at 'config.json'"):
        plan_publish(merged, "me/merged", version="0.1.0", exports=[exports / "safetensors-int8" / "config.json"])
    with pytest.raises(PublishError, match="repo_id 'merged'"):
        plan_publish(merged, "merged", version="0.1.0")
    with pytest.raises(PublishError, match="export not found"):
        plan_publish(merged, "me/merged", version="0.1.0", exports=[tmp_path / "missing.gguf"])


# ---------------------------------------------------------------- against the fake Hub


def test_publish_creates_uploads_and_tags(fake_hub, merged):
    from huggingface_hub import HfApi, hf_hub_download

    card = card_text(merged, evaluation={"quick": {"ppl": 12.5}})
    result = publish_to_hub(merged, "tester/merged", version="1.0.0", card=card, token=TOKEN,
                            endpoint=fake_hub.url)
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    refs = api.list_repo_refs("tester/merged")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0.0": result.commit}
    info = api.model_info("tester/merged", revision="v1.0.0")
    assert info.sha == result.commit and {"merge", "mergelib", "linear"} <= set(info.tags)
    assert sorted(s.rfilename for s in info.siblings) == sorted((".gitattributes", *result.files))
    local = hf_hub_download("tester/merged", "model.safetensors", revision="v1.0.0", endpoint=fake_hub.url)
    assert sha256_file(local) == sha256_file(merged / "model.safetensors")
    readme = hf_hub_download("tester/merged", "README.md", revision="v1.0.0", endpoint=fake_hub.url)
    assert open(readme).read() == card
    commits = [p for m, p in fake_hub.requests if m == "POST" and "/commit/" in p]
    assert len(commits) == 1  # model, card and exports in a single commit


def test_second_publish_of_a_tag_is_refused_before_upload(fake_hub, merged):
    publish_to_hub(merged, "tester/m", version="1.0.0", token=TOKEN, endpoint=fake_hub.url)
    before = commits_on_main(fake_hub, "tester/m")
    with pytest.raises(PublishError) as err:
        publish_to_hub(merged, "tester/m", version="1.0.0", token=TOKEN, endpoint=fake_hub.url)
    assert "\n" not in str(err.value) and "tag 'v1.0.0' already exists" in str(err.value)
    assert commits_on_main(fake_hub, "tester/m") == before
    second = publish_to_hub(merged, "tester/m", version="1.0.1", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.repos["tester/m"].tags["v1.0.1"] == second.commit != fake_hub.repos["tester/m"].tags["v1.0.0"]


def test_failed_upload_leaves_no_tag(fake_hub, merged):
    fake_hub.fail_commits = 1
    with pytest.raises(PublishError) as err:
        publish_to_hub(merged, "tester/flaky", version="2.0.0", token=TOKEN, endpoint=fake_hub.url)
    assert "\n" not in str(err.value) and "nothing was tagged" in str(err.value)
    assert fake_hub.repos["tester/flaky"].tags == {}
    assert commits_on_main(fake_hub, "tester/flaky") == 1  # only the repo's initial commit
    result = publish_to_hub(merged, "tester/flaky", version="2.0.0", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.repos["tester/flaky"].tags == {"v2.0.0": result.commit}


def test_missing_or_wrong_token_is_one_line(fake_hub, merged):
    for token in (None, "hf_wrong"):
        with pytest.raises(PublishError, match=r"not logged in or token rejected; set HF_TOKEN") as err:
            publish_to_hub(merged, "tester/m", version="1.0.0", token=token, endpoint=fake_hub.url)
        assert "\n" not in str(err.value)
    assert fake_hub.repos == {}


def test_offline_mode_and_unreachable_hub_are_refused(hub_env, merged, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(PublishError, match="cannot reach the Hub"):
        publish_to_hub(merged, "tester/m", version="1.0.0", token=TOKEN, endpoint="http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        publish_to_hub(merged, "tester/m", version="1.0.0", token=TOKEN, endpoint="http://127.0.0.1:9")


# ---------------------------------------------------------------- model card


def test_card_records_what_rebuilds_the_merge(merged):
    run = json.loads((merged / "mergelib_run.json").read_text())
    checks = {"gguf-q8_0": {"kl_mean": 1.5e-6, "top1": 0.97, "top1_clear": 1.0, "max_abs_logit_diff": 0.009,
                            "passed": True}}
    card = build_model_card(merged, evaluation={"quick": {"ppl": 12.5, "greedy_match": 0.75}}, export_checks=checks)
    text = str(card)
    for model in run["inputs"]:
        for fname, digest in model["files"].items():
            assert f"| {model['model']} | - | {fname} | `{digest}` |" in text
    assert (merged / "mergekit_config.yml").read_text().strip() in text
    assert f"Seed `{run['seed']}`" in text and f"torch {run['versions']['torch']}" in text
    assert "| quick/ppl | 12.5 |" in text and "| gguf-q8_0 | 1.5e-06 | 0.97 | 1 | 0.009 | yes |" in text
    assert card.data.tags == ["merge", "mergelib", "linear"] and card.data.base_model is None  # local inputs
    assert card.data.base_model_relation == "merge"


def test_card_metadata_from_hub_inputs_and_licenses(tmp_path):
    licensed = tmp_path / "local-ft"
    licensed.mkdir()
    (licensed / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    model = tmp_path / "merged"
    model.mkdir()
    run = {"seed": 3, "method": "ties", "recipe": {"merge_method": "ties"}, "versions": {"mergelib": "0.1.0"},
           "inputs": [{"model": "org/base", "revision": "a" * 40, "files": {"model.safetensors": "b" * 64}},
                      {"model": str(licensed), "revision": None, "files": {"model.safetensors": "c" * 64}}]}
    (model / "mergelib_run.json").write_text(json.dumps(run))
    card = build_model_card(model, tags=("gguf",))
    front = yaml.safe_load(str(card).split("---")[1])
    assert front["base_model"] == ["org/base"] and front["tags"] == ["merge", "mergelib", "ties", "gguf"]
    assert front["license"] == "other"  # one input licensed, the Hub input's card not in the cache
    assert f"| org/base | {'a' * 40} | model.safetensors | `{'b' * 64}` |" in str(card)
    assert build_model_card(model, license="mit").data.license == "mit"
    with pytest.raises(PublishError, match="mergelib_run.json: missing"):
        card_text(tmp_path)


def test_license_resolution():
    assert resolve_license({"a": "mit", "b": "mit"})[0] == "mit"
    assert resolve_license({"a": "mit", "b": "apache-2.0"})[0] == "other"
    assert resolve_license({"a": None, "b": None})[0] is None
    lic, line = resolve_license({"a": "mit", "b": None})
    assert lic == "other" and "no license found for b" in line


# ---------------------------------------------------------------- MLflow Model Registry


def test_register_model_version_points_to_its_run(merged, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    source = log_model_dir(merged, run_id, tracking_uri=uri)
    assert source.endswith("/model")
    assert (tmp_path / "artifacts" / run_id / "artifacts" / "model" / "config.json").is_file()
    first = register_model("tiny-merge", source, run_id=run_id, tag="v1.0.0", aliases=["champion"],
                           tags={"method": "linear"}, tracking_uri=uri)
    assert first.version == "1" and first.aliases == ("v1-0-0", "champion")
    got = client.get_model_version_by_alias("tiny-merge", "v1-0-0")
    assert (str(got.version), got.source, got.run_id) == ("1", source, run_id)
    assert got.tags == {"method": "linear", "mergelib.run_id": run_id, "mergelib.tag": "v1.0.0"}
    assert client.get_run(run_id).data.tags["mergelib.registered_model"] == "tiny-merge/1"
    with pytest.raises(PublishError, match="alias 'v1-0-0' already names version 1") as err:
        register_model("tiny-merge", source, run_id=run_id, tag="v1.0.0", tracking_uri=uri)
    assert "\n" not in str(err.value)
    second = register_model("tiny-merge", source, run_id=run_id, tag="v1.1.0", aliases=["champion"], tracking_uri=uri)
    assert second.version == "2"
    assert str(client.get_model_version_by_alias("tiny-merge", "champion").version) == "2"  # user aliases move
    assert str(client.get_model_version_by_alias("tiny-merge", "v1-0-0").version) == "1"  # release aliases do not


def test_alias_for_tag():
    assert alias_for_tag("v1.2.0") == "v1-2-0" and alias_for_tag("v3") == "release-v3"
    assert alias_for_tag("latest") == "release-latest" and alias_for_tag("nightly_7") == "nightly_7"


# ---------------------------------------------------------------- the real Hub (opt-in)


@pytest.mark.skipif(not (os.environ.get("HF_TOKEN") and os.environ.get("MERGELIB_REAL_HUB_REPO")),
                    reason="set HF_TOKEN and MERGELIB_REAL_HUB_REPO=you/test-repo to publish to the real Hub")
def test_publish_to_the_real_hub(merged, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo_id = os.environ["MERGELIB_REAL_HUB_REPO"]
    tag = f"v0.0.0-test.{int(time.time())}"
    result = publish_to_hub(merged, repo_id, tag=tag, card=card_text(merged), private=True)
    info = HfApi().model_info(repo_id, revision=tag, files_metadata=True)
    assert info.sha == result.commit
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] == (merged / "model.safetensors").stat().st_size  # went through LFS/Xet
    with pytest.raises(PublishError, match="already exists"):
        publish_to_hub(merged, repo_id, tag=tag)
