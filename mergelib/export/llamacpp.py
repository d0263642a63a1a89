"""llama.cpp through llama-cpp-python (the optional extra `mergelib[llamacpp]`): K-quants with its own quantizer
(`llama_model_quantize`), and GGUF files loaded the way llama.cpp users load them, for logits and greedy answers.

The only module that imports `llama_cpp`. Two facts of this binding shape the code: on CPUs that advertise AMX,
quantized inference crashes unless llama.cpp's extra (repacking) buffer types are off, and `Llama(...)` does not
expose that switch, so model params are patched while a file is opened; and one model is open at a time (closed
before the next), as two live instances crashed in the same process.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from mergelib.export.errors import ExportError

# GGUF type name -> llama_ftype (llama.h); the K-quant "_M" mixes keep some tensors at higher precision
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
FALLBACK = re.compile(r"not divisible by \d+ \(required for type +\w+\) -> falling back to +(\w+)")
N_CTX = 512  # at most (and at most the model's own): n_ctx bounds the logits buffer (n_ctx x vocab floats)


def require(what: str):
    """The `llama_cpp` module, or ExportError (one line) naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"{what} needs llama.cpp: pip install 'mergelib[llamacpp]' (or `make demo`)") from None
    return llama_cpp


def available() -> bool:
    """Whether llama-cpp-python is importable (without importing it twice for nothing)."""
    try:
        require("")
    except ExportError:
        return False
    return True


@contextlib.contextmanager
def _collected_log(llama_cpp) -> Iterator[list[str]]:
    """Route llama.cpp's log lines into the yielded list (not the terminal) for the block, then give the log back
    to llama-cpp-python's own handler."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):  # noqa: ANN001 - a C callback
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quantize(f16_file: str | Path, out_file: str | Path, gguf_type: str, threads: int = 1) -> tuple[str, ...]:
    """Quantize an f16 GGUF to `gguf_type` (a K_QUANTS key) with llama.cpp's quantizer; returns notes (how many
    tensors fell back to another type because their rows do not split into 256-wide K-quant blocks)."""
    llama_cpp = require(f"GGUF {gguf_type.upper()}")
    if gguf_type not in K_QUANTS:
        raise ExportError(f"gguf type '{gguf_type}': llama.cpp quantizes {', '.join(K_QUANTS)} here")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[gguf_type]
    params.nthread = threads
    with _collected_log(llama_cpp) as log:
        rc = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(), ctypes.byref(params))
    if rc != 0:
        tail = " | ".join(line.strip() for line in "".join(log).splitlines()[-3:])
        raise ExportError(f"{out_file}: llama.cpp could not quantize to {gguf_type} (rc {rc}: {tail[:300]})")
    fallbacks: dict[str, int] = {}
    for line in "".join(log).splitlines():
        if match := FALLBACK.search(line):
            fallbacks[match[1]] = fallbacks.get(match[1], 0) + 1
    return tuple(f"{n} tensor(s) stored as {kind}: rows not a multiple of 256 (llama.cpp's K-quant fallback)"
                 for kind, n in sorted(fallbacks.items()))


@contextlib.contextmanager
def open_gguf(path: str | Path, threads: int = 1) -> Iterator:
    """A `llama_cpp.Llama` on `path` (CPU, logits of every position, deterministic thread count, no repacking
    buffers), closed on exit. Raises ExportError when llama.cpp cannot load the file."""
    llama_cpp = require("checking a GGUF with llama.cpp")
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params

    def params_without_repack():
        params = original()
        params.use_extra_bufts = False
        return params

    n_ctx = min(N_CTX, _context_length(path))
    low.llama_model_default_params = params_without_repack
    try:
        with _collected_log(llama_cpp) as log:
            try:
                model = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                        n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
            except ValueError as exc:
                model = exc
    finally:
        low.llama_model_default_params = original
    if isinstance(model, ValueError):
        lines = "".join(log).splitlines()
        detail = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower()), str(model))
        raise ExportError(f"{Path(path).name}: llama.cpp cannot load it ({detail[:300]})")
    try:
        yield model
    finally:
        model.close()


def _context_length(path: str | Path) -> int:
    """The file's `<arch>.context_length` (N_CTX when it cannot be read: llama.cpp will say what is wrong)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.get_field("general.architecture").contents()
        return int(reader.get_field(f"{arch}.context_length").contents())
    except (OSError, ValueError, AttributeError, KeyError):
        return N_CTX


def tokenize(model, text: str) -> list[int]:
    """Token ids llama.cpp gives `text`, with the specials the file says to add (BOS/EOS flags)."""
    return model.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def logits(model, prompt_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Next-token logits at every position of each prompt: [positions, vocab] float32 per prompt."""
    out = []
    for ids in prompt_ids:
        room = min(model.n_ctx(), len(model.input_ids))  # llama.cpp may round n_ctx up; the binding's buffers not
        if len(ids) > room:
            raise ExportError(f"a check prompt has {len(ids)} tokens; llama.cpp is opened with n_ctx {room}")
        model.reset()
        model.eval(list(ids))
        out.append(torch.from_numpy(np.array(model.scores[: len(ids)], dtype=np.float32)))
    return out


def greedy_answers(model, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str | None]:
    """Greedy continuation of each prompt (llama.cpp's own tokenizer and logits), decoded; None where the file's
    EOS did not come within `max_new_tokens`. Argmax over the logits, so no sampler settings are involved."""
    eos_id = model.token_eos()
    answers: list[str | None] = []
    for prompt in prompts:
        ids = tokenize(model, prompt)
        model.reset()
        model.eval(ids)
        out: list[int] = []
        answer = None
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(model.scores[model.n_tokens - 1]))
            if nxt == eos_id:
                answer = model.detokenize(out).decode("utf-8", "replace")
                break
            out.append(nxt)
            model.eval([nxt])
        answers.append(answer)
    return answers
