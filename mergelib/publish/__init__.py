"""Publishing a merge: the Hub (one commit, then a tag that is never moved), its model card, and the MLflow
Model Registry."""

from mergelib.publish.card import build_model_card, card_text, read_run
from mergelib.publish.errors import PublishError
from mergelib.publish.hub import PublishPlan, PublishResult, plan_publish, publish_to_hub, tag_for
from mergelib.publish.registry import RegisteredVersion, alias_for_tag, log_model_dir, register_model

__all__ = [
    "PublishError",
    "PublishPlan",
    "PublishResult",
    "RegisteredVersion",
    "alias_for_tag",
    "build_model_card",
    "card_text",
    "log_model_dir",
    "plan_publish",
    "publish_to_hub",
    "read_run",
    "register_model",
    "tag_for",
]
