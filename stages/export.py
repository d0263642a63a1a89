"""Stage export: re-save the merged model (with its tokenizer) as safetensors in export.dtype."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline_steps import export_safetensors

    ex = config.export
    info = export_safetensors(config.paths.merged, config.paths.tokenizer, config.paths.export, ex.dtype,
                              ex.shard_size)
    tracker.log_metrics({"export.bytes": info["bytes"], "export.shards": info["shards"]})
    return f"wrote {config.paths.export} ({ex.dtype}, {info['shards']} shard(s), {info['bytes'] / 1e6:.1f} MB)"


if __name__ == "__main__":
    main("export", run)
