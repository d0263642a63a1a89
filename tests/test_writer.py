"""Planned safetensors shards: readable by the safetensors library, bytes independent of write order."""

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergelib.io.hashing import shard_digest
from mergelib.io.index import index_model
from mergelib.io.writer import ShardFile, TensorSlot, shard_names, write_index

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b.bias": torch.arange(7, dtype=torch.float16),
    "c.weight": torch.randn(2, 2, 2).to(torch.bfloat16),
    "empty": torch.zeros(0, 4),
    "scalar": torch.tensor(3.5),
}


def write(path, order):
    slots = [TensorSlot(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()]
    shard = ShardFile(path, slots)
    for name in order:
        shard.write(name, TENSORS[name])
    shard.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_reads_back_every_tensor(tmp_path):
    write(tmp_path / "model.safetensors", list(TENSORS))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(TENSORS)
        for name, tensor in TENSORS.items():
            got = handle.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"] == {"format": "pt"}


def test_bytes_do_not_depend_on_write_order(tmp_path):
    names = list(TENSORS)
    digests = set()
    for i in range(4):
        random.Random(i).shuffle(names)
        digests.add(write(tmp_path / f"m{i}.safetensors", names))
    assert len(digests) == 1


def test_running_digest_equals_the_digest_of_the_file(tmp_path):
    """Ranges written ahead of the hashed prefix (any order, whole tensors or row blocks) still give the
    shard_digest of the finished file, which is what a resumed merge checks a shard against."""
    slots = [TensorSlot(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()]
    for i in range(4):
        path = tmp_path / f"d{i}.safetensors"
        shard = ShardFile(path, slots)
        names = list(TENSORS)
        random.Random(i).shuffle(names)
        for name in names:
            if name == "a.weight":  # in row blocks, the last first
                for start in (2, 0):
                    shard.write_rows(name, start, TENSORS[name][start : start + 2])
            else:
                shard.write(name, TENSORS[name])
        shard.close()
        assert shard.digest() == shard_digest(path)


def test_digest_before_every_tensor_is_written_is_refused(tmp_path):
    slots = [TensorSlot(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()]
    shard = ShardFile(tmp_path / "part.safetensors", slots)
    shard.write("b.bias", TENSORS["b.bias"])
    with pytest.raises(RuntimeError, match="before every tensor"):
        shard.digest()
    shard.close()


def test_index_and_shard_names(tmp_path):
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    slots = {n: [TensorSlot(k, tuple(v.shape), v.dtype)] for n, (k, v) in zip(shard_names(2), list(TENSORS.items())[:2])}
    for fname, group in slots.items():
        shard = ShardFile(tmp_path / fname, group)
        shard.write(group[0].name, TENSORS[group[0].name])
        shard.close()
    write_index(tmp_path, slots, {"mergelib_version": "x"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 15 * 4 + 7 * 2
    assert index["weight_map"] == {"a.weight": shard_names(2)[0], "b.bias": shard_names(2)[1]}
    (tmp_path / "config.json").write_text("{}")
    infos = index_model(tmp_path).tensors
    assert infos["b.bias"].shape == (7,) and infos["b.bias"].dtype == torch.float16


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_committed_outputs_follow_the_user_s_umask(tmp_path, mask):
    """mkdtemp staging and safetensors' writer make owner-only files; what lands follows the umask."""
    import os
    import tempfile

    from safetensors.torch import save_file

    from mergelib.io.atomic import commit_dir

    previous = os.umask(mask)
    try:
        staged = Path(tempfile.mkdtemp(dir=tmp_path))
        (staged / "sub").mkdir()
        save_file({"x": torch.zeros(2)}, staged / "sub" / "w.safetensors")
        (staged / "w.safetensors").write_bytes(b"")
        (staged / "w.safetensors").chmod(0o600)
        commit_dir(staged, tmp_path / "out")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert (out.stat().st_mode & 0o777, (out / "sub").stat().st_mode & 0o777) == (0o777 & ~mask,) * 2
    for f in (out / "w.safetensors", out / "sub" / "w.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask


def test_write_queue_gives_the_same_bytes_and_digest_as_direct_writes(tmp_path):
    from mergelib.io.writer import WriteQueue

    direct = write(tmp_path / "direct.safetensors", list(TENSORS))
    slots = [TensorSlot(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()]
    shard = ShardFile(tmp_path / "queued.safetensors", slots)
    writes = WriteQueue(limit=16)  # smaller than most tensors: each waits for the one before it
    for name in reversed(list(TENSORS)):
        tensor = TENSORS[name]
        if tensor.dim() and tensor.shape[0] > 1:  # row blocks, as streamed tensors arrive
            writes.write(shard, name, tensor[1:].clone(), 1)
            writes.write(shard, name, tensor[:1].clone(), 0)
        else:
            writes.write(shard, name, tensor)
    digests = []
    writes.call(lambda: digests.append(shard.digest()))  # runs after every write queued before it
    writes.close()
    shard.close()
    assert hashlib.sha256((tmp_path / "queued.safetensors").read_bytes()).hexdigest() == direct
    assert digests == [shard_digest(tmp_path / "queued.safetensors")]


def test_write_queue_raises_the_writer_s_first_failure_and_drops_the_rest(tmp_path, monkeypatch):
    import errno
    import os

    from mergelib.io.writer import WriteQueue

    slots = [TensorSlot(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()]
    shard = ShardFile(tmp_path / "m.safetensors", slots)
    monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    writes = WriteQueue()
    writes.write(shard, "a.weight", TENSORS["a.weight"])
    released = []
    writes.call(lambda: released.append(1), always=True)  # what a job holds goes back even after the failure
    ran = []
    with pytest.raises(OSError) as info:  # raised by a later submit or, at the latest, by close
        writes.write(shard, "b.bias", TENSORS["b.bias"])
        writes.call(lambda: ran.append(1))
        writes.close()
    assert info.value.errno == errno.ENOSPC and ran == []
    writes.close(abandon=True)  # after a failure: returns, raises nothing more
    assert released == [1]
    fresh = WriteQueue()
    with pytest.raises(ValueError, match="planned"):  # a tensor that does not fit is refused before queueing
        fresh.write(shard, "a.weight", torch.zeros(2, 2))
    fresh.close()
    shard.close()
